"""`python -m groupcover.measure.integrity_escape`: how small a change the integrity check misses.

A worker computes honestly, then moves ONE element (the middle one) of every result of one layer
(the middle offloaded layer) by `relative` x that result's largest magnitude, what a worker can
see. For each mode and each `relative` (decades) it runs one forward with the check on and
prints whether the check caught it and, when it did not, how far the output moved (max |error| /
max |output|): the tolerance rule of `groupcover.integrity` measured on a real model.
"""

from __future__ import annotations

import argparse

import torch

from groupcover.errors import IntegrityError
from groupcover.inprocess import InProcessTransport
from groupcover.models import load_model
from groupcover.modes import build_for_mode, mode_settings
from groupcover.worker import WorkerState

RELATIVE = tuple(10.0**-k for k in range(2, 15))


class OneElementWorker(WorkerState):
    """Honest, except that one element of every result of `layer_id` moves by `relative` x the
    result's largest magnitude (for masked modes' residues mod 2^32: of the largest residue,
    about 2^31 quanta: the worker sees nothing else)."""

    def __init__(self, layer_id: str, relative: float) -> None:
        super().__init__(torch.device("cpu"))
        self.layer_id, self.relative = layer_id, relative

    def run(self, owner: str, layer_id: str, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        y, seconds = super().run(owner, layer_id, x)
        if layer_id == self.layer_id:
            where = tuple(size // 2 for size in y.shape)
            change = self.relative * float(y.double().abs().max())
            if y.is_floating_point():
                y[where] += change
            else:  # residues mod 2^32 (masked modes): the change in whole quanta, wrapping
                y[where] = int((int(y[where]) + round(change) + 2**31) % 2**32 - 2**31)
        return y, seconds


def sweep(
    model_name: str = "minilm",
    modes: tuple[str, ...] = ("plain-offload", "groupcover-nomask", "groupcover", "hardened"),
    relative: tuple[float, ...] = RELATIVE,
    batch: int = 2,
    seq: int = 16,
) -> list[dict[str, object]]:
    """One row per (mode, relative): caught, and the output's relative error when not caught
    (against the plaintext model's output; honest float rounding alone gives the mode's rel_err)."""
    model, example = load_model(model_name, 0)
    model.eval()
    inputs = tuple(example(batch, seq))
    with torch.no_grad():
        reference = model(*inputs)
    names = [name for name, m in model.named_modules()
             if isinstance(m, torch.nn.Linear | torch.nn.Conv1d | torch.nn.Conv2d)]  # fmt: skip
    layer = names[len(names) // 2]
    rows: list[dict[str, object]] = []
    for mode in modes:
        for step in relative:
            worker = OneElementWorker(layer, step)
            filled = inputs if mode_settings(mode)[1] else None
            built = build_for_mode(model, mode, InProcessTransport(worker), verify=True,
                                   example_inputs=filled)  # fmt: skip
            row: dict[str, object] = {"mode": mode, "layer": layer, "relative": step}
            try:
                with torch.no_grad():
                    out = built(*inputs)
            except IntegrityError:
                row.update(caught=True, output_rel_err=None)
            else:
                error = float((out - reference).abs().max() / reference.abs().max())
                row.update(caught=False, output_rel_err=error)
            rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--modes", default="plain-offload,groupcover-nomask,groupcover,hardened")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=16)
    args = parser.parse_args()
    modes = tuple(m for m in args.modes.split(",") if m)
    for row in sweep(args.model, modes, batch=args.batch, seq=args.seq):
        verdict = (
            "caught"
            if row["caught"]
            else f"PASSED, output off by {row['output_rel_err']:.1e} of its largest value"
        )
        print(f"{row['mode']:18} {row['layer']}: one element +{row['relative']:.0e} x max|y|: "
              f"{verdict}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
