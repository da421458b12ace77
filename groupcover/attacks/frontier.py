"""Robustness against latency, per design tried: `python -m groupcover.attacks.frontier`.

Robustness: the lowest error ratio any weight-only attack of the suite reaches on the layers of
one encoder block of the fine-tuned victim (the payload attacks run in the full evaluation).
Latency: the master's extra work per layer (input transform + restore, one thread, CPU time),
for MiniLM's four shapes at batch 8 x 128 in the layouts the master uses (FFN1's output and
FFN2's input features-first), relative to the plain `F.linear` of the same shapes.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from collections.abc import Callable
from typing import Any, cast

import torch
import torch.nn.functional as F

from groupcover.argtypes import non_negative_int, output_file, positive_int
from groupcover.attacks import core
from groupcover.attacks.methods import default_suite
from groupcover.layer_op import apply_op
from groupcover.schemes import Scheme
from groupcover.schemes._rng import seeded
from groupcover.schemes.baselines import PaperGroupCoverScheme
from groupcover.schemes.hardened import HardenedScheme
from groupcover.transport import LayerOp

MINILM_SHAPES = ((1152, 384), (384, 384), (1536, 384), (384, 1536))  # (out, in): qkv, out, ffn


def designs() -> dict[str, Callable[[], Scheme]]:
    return {
        "groupcover-paper k=4": lambda: PaperGroupCoverScheme(k=4),
        "one-sided out, 2 rounds": lambda: HardenedScheme(rounds=2, sides="out"),
        "one-sided in, 2 rounds": lambda: HardenedScheme(rounds=2, sides="in"),
        "two-sided block-diagonal b=48 (1 round)": lambda: HardenedScheme(rounds=1, block=48),
        "two-sided butterfly, 2 rounds (shipped)": lambda: HardenedScheme(rounds=2),
        "two-sided butterfly, 3 rounds": lambda: HardenedScheme(rounds=3),
        "two-sided dense (1 round, b = n)": lambda: HardenedScheme(rounds=1),
    }


def _cpu_ms(fn: Callable[[], object], repeat: int) -> float:
    fn()
    samples = []
    for _ in range(repeat):
        start = time.thread_time()
        fn()
        samples.append((time.thread_time() - start) * 1e3)
    return statistics.median(samples)


def latency(scheme: Scheme, repeat: int = 5, batch: int = 8, seq: int = 128) -> dict[str, float]:
    """Per-layer extra ms of the master and the plain linear ms, summed over MiniLM's shapes."""
    gen = torch.Generator().manual_seed(0)
    linear = extra = 0.0
    for i, (out, inn) in enumerate(MINILM_SHAPES):
        weight = torch.randn(out, inn, generator=gen) / inn**0.5
        x = torch.randn(batch, seq, inn, generator=gen)
        if i == 3:  # FFN2's input is FFN1's features-first result
            x = x.transpose(0, 2).contiguous().transpose(0, 2)
        published, secret = scheme.obfuscate(weight, None, cast(Any, seeded(i)))
        op = scheme.worker_op(LayerOp("linear"))
        y = apply_op(op, scheme.prepare_input(x, secret), published)
        first = i == 2  # FFN1's result stays features-first

        def restore(y: torch.Tensor = y, secret: Any = secret, first: bool = first) -> object:
            return scheme.restore(y.clone(), secret, features_first=first)

        clone_ms = _cpu_ms(functools.partial(torch.clone, y), repeat)
        linear += _cpu_ms(functools.partial(F.linear, x, weight), repeat)
        extra += _cpu_ms(functools.partial(scheme.prepare_input, x, secret), repeat)
        extra += max(0.0, _cpu_ms(restore, repeat) - clone_ms)
    return {"linear_ms": linear, "extra_ms": extra, "extra_over_linear": extra / linear}


def robustness(scheme: Scheme, block: int) -> dict[str, Any]:
    # Here, not at the top: the victim machinery costs start-up time, and the command line of
    # every verb imports this module for its flags (`python -m groupcover frontier`).
    from groupcover.attacks.harness import _weight
    from groupcover.attacks.victim import load_victim, public_encoder

    victim, _ = load_victim(log=False)
    public = public_encoder()
    worst: dict[str, Any] = {}
    for part in ("attention.qkv", "attention.out", "ffn1", "ffn2"):
        name = f"layer.{block}.{part}"
        w_vic, w_pub = _weight(victim.encoder, name), _weight(public, name)
        published, _ = scheme.obfuscate(w_vic.to(torch.float32), None, cast(Any, seeded(7)))
        view = core.LayerView(name, w_pub, published.to(torch.float64), 4)
        best, best_attack = float("inf"), ""
        for attack in default_suite():
            if attack.uses_payloads:
                continue
            rec = attack.run(view)
            weight = w_pub if rec is None else core.anchor(rec.weight, w_pub)
            ratio = core.error_ratio(weight, w_vic, w_pub)
            if ratio < best:
                best, best_attack = ratio, attack.name
        worst[name] = {"error_ratio": best, "attack": best_attack}
    return {"min_error_ratio": min(v["error_ratio"] for v in worst.values()), "layers": worst}


def frontier(block: int = 2, repeat: int = 5) -> list[dict[str, Any]]:
    torch.set_num_threads(1)
    rows = []
    for label, make in designs().items():
        scheme = make()
        row = {"design": label, **latency(scheme, repeat), **robustness(scheme, block)}
        print(f"{label:42s} min ratio {row['min_error_ratio']:.3f}  master extra "
              f"{row['extra_ms']:.1f} ms per block = {row['extra_over_linear']:.2f} x linear",
              flush=True)  # fmt: skip
        rows.append(row)
    return rows


DESCRIPTION = "robustness against the master's latency, per scheme design tried"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `python -m groupcover frontier` (and of this module's own command line)."""
    parser.add_argument("--block", type=non_negative_int("--block"), default=2)
    parser.add_argument("--repeat", type=positive_int("--repeat"), default=5)
    parser.add_argument("--json", type=output_file("--json"), default=None)


def run(args: argparse.Namespace) -> int:
    rows = frontier(args.block, args.repeat)
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


def main() -> None:
    """`python -m groupcover.attacks.frontier`: the `frontier` verb under its historical name."""
    parser = argparse.ArgumentParser(description=__doc__)
    add_arguments(parser)
    run(parser.parse_args())


if __name__ == "__main__":
    main()
