"""`python -m groupcover.measure.fused_restore`: the master's CPU with a scheme's permutation
and restore in the masked passes, against the same scheme with them run on their own.

For each scheme two protected copies of one model are built, the scheme as it is (its
`input_order` applied while blinding, its `fused_restore` in the unmasking pass) and the same
scheme with both hooks off (`prepare_input` and `restore` run as torch ops around the passes).
Their forwards run interleaved in one process, behind in-process workers; a forward's master
CPU is this thread's CPU time less what the worker's store spent computing (the clones of the
in-process link stay in, as the wire's copies would). Pools hold a pair per forward and one for
the warm-up, so no mask is made inside a timed forward. Needs numba (without it both copies take
the torch path).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch

from groupcover.inprocess import InProcessTransport
from groupcover.master import protect
from groupcover.models import load_model
from groupcover.schemes import make_scheme
from groupcover.schemes.base import Scheme
from groupcover.worker import WorkerState


def unfused(scheme: Scheme) -> Scheme:
    """The same scheme (same class, same settings) with its fused hooks off."""
    cls = type(scheme)
    hooks_off: dict[str, Any] = {
        "input_order": lambda self, secret: None,
        "fused_restore": lambda self, secret, features_first: None,
    }
    plain: type[Scheme] = type(f"Unfused{cls.__name__}", (cls,), hooks_off)  # not registered
    copy = object.__new__(plain)
    copy.__dict__.update(scheme.__dict__)
    return copy


class ClockedWorker(WorkerState):
    """An in-process worker's store that counts the CPU time it spends computing (on the
    master's thread: the in-process link calls it there)."""

    def __init__(self) -> None:
        super().__init__(torch.device("cpu"))
        self.seconds = 0.0

    def run(self, owner: str, layer_id: str, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        start = time.thread_time()
        try:
            return super().run(owner, layer_id, x)
        finally:
            self.seconds += time.thread_time() - start


def compare(
    model_name: str = "bert-base",
    schemes: tuple[str, ...] = ("groupcover",),
    batch: int = 4,
    seq: int = 128,
    forwards: int = 4,
    k: int = 4,
) -> list[dict[str, object]]:
    """Per scheme: the median and minimum master CPU ms per forward, fused and unfused."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, example = load_model(model_name, 0)
        model.eval()
        inputs = tuple(example(batch, seq))
        rows = []
        with torch.no_grad():
            for name in schemes:
                fused = make_scheme(name, k)
                copies = {}
                for variant, scheme in (("fused", fused), ("unfused", unfused(fused))):
                    worker = ClockedWorker()
                    protected = protect(model, InProcessTransport(worker), scheme=scheme,
                                        masked=True, example_inputs=inputs,
                                        mask_pool=forwards + 1)  # fmt: skip
                    protected(*inputs)  # warm-up: compiles the kernels
                    copies[variant] = (protected, worker)
                samples: dict[str, list[float]] = {variant: [] for variant in copies}
                for _ in range(forwards):
                    for variant, (protected, worker) in copies.items():
                        worker.seconds = 0.0
                        start = time.thread_time()
                        protected(*inputs)
                        spent = time.thread_time() - start - worker.seconds
                        samples[variant].append(spent * 1e3)
                for variant, times in samples.items():
                    median, least = statistics.median(times), min(times)
                    rows.append({"scheme": name, "variant": variant, "median_ms": median,
                                 "min_ms": least})  # fmt: skip
                del copies
        return rows
    finally:
        torch.set_num_threads(previous)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bert-base")
    parser.add_argument("--schemes", default="groupcover,identity")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--forwards", type=int, default=4)
    args = parser.parse_args()
    schemes = tuple(s for s in args.schemes.split(",") if s)
    for row in compare(args.model, schemes, args.batch, args.seq, args.forwards):
        print(f"{row['scheme']:12} {row['variant']:8} master CPU per forward: median "
              f"{row['median_ms']:.1f} ms, min {row['min_ms']:.1f} ms", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
