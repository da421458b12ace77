"""`python -m groupcover.measure.precision`: what float64 costs the worker, and why it pays it.

Masked modes (`mask-only`, `groupcover`, `hardened`) publish their layers in float64 and the
worker computes `op(x + r, W'')` in float64 (`groupcover.masks`). On a CPU float64 GEMMs run at
about half the float32 rate; consumer GPUs run float64 at 1/32-1/64 of it. This tool measures
both sides of that choice on MiniLM's offloaded layers (fused QKV 384 -> 1152, attention output
384 -> 384, FFN1 384 -> 1536, FFN2 1536 -> 384; six encoder layers, one call each per forward):

1. time: the worker's product for each layer at batch x seq rows, float32 and float64 side by
   side in one run, interleaved (each round times every layer in both dtypes, alternating which
   goes first), median of N with the interquartile range, and the paired float64 / float32 ratio
   of each round. On the CPU always, on CUDA when torch sees a device (TF32 off, as the worker
   sets it); on CUDA also the worker's whole call (`WorkerState.run`: payload to the device,
   product, result back), which float64 doubles the bytes of.
2. exactness: one masked product as the masked modes make it (the input in fixed point plus a
   one-time mask mod 2^32, `groupcover.masks`), the worker's product taken in float64 and in
   float32, unmasked by the master, and its relative error (max |y - ref| / max |ref|) against
   the float32 model's own product. In float32 the payload's 32 bits do not fit the 24-bit
   mantissa: the input's low bits are lost, and the error is orders of magnitude above the
   float32 model's own.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from groupcover import texttable
from groupcover.bench.stats import quantile
from groupcover.integrity import MINILM_SHAPES
from groupcover.layer_op import LayerOp, apply_op, to_residues, unquantized, with_quantum
from groupcover.masks import MaskPool
from groupcover.modular import INPUT_BITS, quantum_exponent
from groupcover.rng import SecretRandom
from groupcover.worker import WorkerState, exact_math

MINILM_LAYERS = 6  # encoder layers: each offloads every shape once per forward
NAMES = ("qkv", "attn-out", "ffn1", "ffn2")  # MINILM_SHAPES' order
DTYPES = {"float32": torch.float32, "float64": torch.float64}
# the op groupcover and hardened publish for a linear layer (mask-only: F.linear, same FLOPs)
WORKER_OP = LayerOp("linear", params={"transposed": 1})


@dataclass(frozen=True)
class Shape:
    name: str
    in_features: int
    out_features: int
    rows: int  # batch x seq
    per_forward: int = MINILM_LAYERS

    @property
    def label(self) -> str:
        return f"{self.name} {self.in_features}->{self.out_features}"

    @property
    def flops(self) -> int:
        return 2 * self.rows * self.in_features * self.out_features


def shapes(batch: int, seq: int) -> list[Shape]:
    """MiniLM's offloaded linear layers at batch x seq: what the masked modes' worker computes."""
    pairs = zip(NAMES, MINILM_SHAPES, strict=True)
    return [Shape(name, i, o, batch * seq) for name, (i, o) in pairs]


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median and interquartile range (p25, p75) of a series."""
    return {
        "median": statistics.median(values),
        "p25": quantile(values, 0.25),
        "p75": quantile(values, 0.75),
        "n": len(values),
    }


def paired_ratio(slow: Sequence[float], fast: Sequence[float]) -> dict[str, float]:
    """slow / fast per round (the two taken back to back), summarised: a busy host's drift
    between rounds cancels in each ratio."""
    return spread([a / b for a, b in zip(slow, fast, strict=True) if b > 0])


def _timer(device: torch.device) -> Callable[[Callable[[], object]], float]:
    def timed(fn: Callable[[], object]) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    return timed


def time_products(device: torch.device, layers: Sequence[Shape], repeat: int, warmup: int = 1,
                  seed: int = 0, calls_too: bool | None = None,
                  ) -> list[dict[str, object]]:  # fmt: skip
    """Per layer and dtype: seconds of the worker's product (and, with `calls_too`, by default
    on CUDA only, of its whole call), interleaved round by round; plus the paired float64 /
    float32 ratios."""
    generator = torch.Generator().manual_seed(seed)  # data, not secrets
    timed = _timer(device)
    if calls_too is None:
        calls_too = device.type == "cuda"  # on the CPU a call is the product
    worker = WorkerState(device) if calls_too else None
    cases: dict[tuple[str, str], Callable[[], object]] = {}
    calls: dict[tuple[str, str], Callable[[], object]] = {}
    for layer in layers:
        weight = torch.randn(layer.out_features, layer.in_features, generator=generator)
        x = torch.randn(1, layer.rows, layer.in_features, generator=generator)
        for name, dtype in DTYPES.items():
            w_dev, x_dev = weight.to(device, dtype), x.to(device, dtype)
            cases[layer.label, name] = partial(apply_op, WORKER_OP, x_dev, w_dev)
            if worker is not None:
                layer_id = f"{layer.label}/{name}"
                worker.publish("precision", layer_id, weight.to(dtype), WORKER_OP)
                calls[layer.label, name] = partial(worker.run, "precision", layer_id, x.to(dtype))
    product: dict[tuple[str, str], list[float]] = {key: [] for key in cases}
    call: dict[tuple[str, str], list[float]] = {key: [] for key in calls}
    order = list(DTYPES)
    for round_ in range(warmup + repeat):
        for layer in layers:
            for name in order if round_ % 2 == 0 else order[::-1]:
                key = (layer.label, name)
                seconds = timed(cases[key])
                if key in calls:
                    call_seconds = timed(calls[key])
                if round_ >= warmup:
                    product[key].append(seconds)
                    if key in calls:
                        call[key].append(call_seconds)
    rows: list[dict[str, object]] = []
    for layer in layers:
        row: dict[str, object] = {"device": str(device), "layer": layer.label,
                                  "rows": layer.rows, "per_forward": layer.per_forward,
                                  "gflop": layer.flops / 1e9}  # fmt: skip
        for kind, series in (("product", product), ("call", call)):
            if (layer.label, "float32") not in series:
                continue
            f32, f64 = series[layer.label, "float32"], series[layer.label, "float64"]
            row[kind] = {
                "float32_ms": spread([s * 1e3 for s in f32]),
                "float64_ms": spread([s * 1e3 for s in f64]),
                "ratio": paired_ratio(f64, f32),
            }
        rows.append(row)
    return rows


def per_forward_ms(rows: Sequence[dict[str, object]], kind: str = "product") -> dict[str, float]:
    """The worker's time for one MiniLM forward per dtype (each layer's median x its calls)."""
    totals = {name: 0.0 for name in DTYPES}
    for row in rows:
        part = row.get(kind)
        if not isinstance(part, dict):
            continue
        for name in DTYPES:
            totals[name] += part[f"{name}_ms"]["median"] * int(row["per_forward"])  # type: ignore[call-overload]
    return totals


def masked_error(layer: Shape, worker_dtype: torch.dtype, seed: int = 0) -> dict[str, object]:
    """One masked product as the masked modes make it (int32 residues mod 2^32,
    `groupcover.masks`), the worker's product taken in `worker_dtype`; the master's unmasked
    result against the float32 model's product (relative error)."""
    generator = torch.Generator().manual_seed(seed)  # data, not secrets
    weight = torch.randn(layer.out_features, layer.in_features, generator=generator)
    weight /= layer.in_features**0.5
    x = torch.randn(1, layer.rows, layer.in_features, generator=generator)
    op = with_quantum(WORKER_OP, quantum_exponent(weight.double(), WORKER_OP))
    pool = MaskPool(SecretRandom.from_seed(seed))
    pool.register("layer", weight, op)
    pair = pool.take("layer", tuple(x.shape), x)  # calibrates B from x: a power of two
    _rho, u = pair.consume()
    blinded = pool.blind("layer", x, pair)
    published = pool.published_weight("layer")  # float64
    product = apply_op(unquantized(op), blinded.payload.to(worker_dtype),
                       published.to(worker_dtype))  # fmt: skip
    y = to_residues(product.to(torch.float64), op.params["quantum"])  # what the worker returns
    result = pool.unblind("layer", y, u, blinded)
    out = result.output.to(torch.float64)
    reference = apply_op(WORKER_OP, x, weight).to(torch.float64)  # the float32 model
    exact = apply_op(WORKER_OP, x.double(), weight.double())
    return {
        "layer": layer.label,
        "rows": layer.rows,
        "worker_dtype": str(worker_dtype).removeprefix("torch."),
        "input_bits": INPUT_BITS,
        "input_bound": pool.bound("layer"),
        "rel_err": float((out - reference).abs().max() / reference.abs().max()),
        "rel_err_vs_exact": float((out - exact).abs().max() / exact.abs().max()),
        # the float32 model's own rounding, for scale
        "float32_model_rel_err": float((reference - exact).abs().max() / exact.abs().max()),
    }


def errors(layers: Sequence[Shape]) -> list[dict[str, object]]:
    """Every layer masked, with a float64 and a float32 worker: the payload's 32 bits (X and
    the mask rho) do not fit float32's 24-bit mantissa, so a float32 product loses the input."""
    return [masked_error(layer, d) for layer in layers for d in (torch.float64, torch.float32)]


def _cell(part: dict[str, dict[str, float]], key: str) -> str:
    s = part[key]
    if key == "ratio":
        return f"{s['median']:.2f}x ({s['p25']:.2f}-{s['p75']:.2f})"
    return f"{s['median']:.2f} ({s['p25']:.2f}-{s['p75']:.2f})"


def render_times(rows: Sequence[dict[str, object]], title: str) -> str:
    headers = ("device", "layer", "what", "float32 ms (IQR)", "float64 ms (IQR)",
               "float64/float32 (IQR)", "f32 GFLOP/s", "f64 GFLOP/s")  # fmt: skip
    table = []
    for row in rows:
        for kind in ("product", "call"):
            part = row.get(kind)
            if not isinstance(part, dict):
                continue
            rate = {d: float(row["gflop"]) / part[f"{d}_ms"]["median"] * 1e3 for d in DTYPES}  # type: ignore[arg-type]
            table.append((str(row["device"]), str(row["layer"]), kind, _cell(part, "float32_ms"),
                          _cell(part, "float64_ms"), _cell(part, "ratio"),
                          f"{rate['float32']:.0f}", f"{rate['float64']:.0f}"))  # fmt: skip
    return texttable.render(title, headers, table, left=3)


def render_errors(found: Sequence[dict[str, object]]) -> str:
    headers = ("layer", "worker dtype", "input bits", "rel. error vs float32 model",
               "vs exact", "float32 model vs exact")  # fmt: skip
    table = [(str(e["layer"]), str(e["worker_dtype"]), str(e["input_bits"]), f"{e['rel_err']:.1e}",
              f"{e['rel_err_vs_exact']:.1e}", f"{e['float32_model_rel_err']:.1e}")
             for e in found]  # fmt: skip
    title = "A masked product (int32 residues mod 2^32), unmasked by the master"
    return texttable.render(title, headers, table, left=2)


def devices(requested: str | None) -> list[torch.device]:
    if requested:
        return [torch.device(name) for name in requested.split(",") if name]
    found = [torch.device("cpu")]
    if torch.cuda.is_available():
        found.append(torch.device("cuda"))
    return found


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m groupcover.measure.precision",
                                     description=__doc__.splitlines()[0])  # fmt: skip
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=15, help="rounds timed (median of these)")
    parser.add_argument("--warmup", type=int, default=2, help="rounds run first, not timed")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--devices", default=None, help="e.g. cpu,cuda (default: cpu, and cuda "
                        "when torch sees one)")  # fmt: skip
    parser.add_argument("--no-error", action="store_true", help="skip the exactness part")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = parser.parse_args(argv)
    if args.batch < 1 or args.seq < 1 or args.repeat < 1 or args.warmup < 0 or args.threads < 1:
        parser.error("--batch, --seq, --repeat and --threads must be >= 1, --warmup >= 0")
    torch.set_num_threads(args.threads)
    exact_math()  # what a worker sets when it starts: no TF32 in float32 products
    layers = shapes(args.batch, args.seq)
    document: dict[str, object] = {"batch": args.batch, "seq": args.seq, "repeat": args.repeat,
                                   "threads": args.threads, "torch": torch.__version__}  # fmt: skip
    timings: list[dict[str, object]] = []
    for device in devices(args.devices):
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
        rows = time_products(device, layers, args.repeat, args.warmup)
        timings += rows
        title = (f"The worker's products on {device} ({name}, {args.threads} CPU thread(s)), "
                 f"MiniLM at batch {args.batch} x seq {args.seq}, "
                 f"median of {args.repeat}")  # fmt: skip
        print(render_times(rows, title), flush=True)
        for kind in ("product", "call"):
            total = per_forward_ms(rows, kind)
            if total["float32"] > 0:
                print(f"{device} per MiniLM forward ({MINILM_LAYERS} x 4 calls, {kind}): "
                      f"float32 {total['float32']:.1f} ms, float64 {total['float64']:.1f} ms, "
                      f"ratio {total['float64'] / total['float32']:.2f}x\n",
                      flush=True)  # fmt: skip
    document["timings"] = timings
    if not args.no_error:
        found = errors(layers)
        document["errors"] = found
        print(render_errors(found), flush=True)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(document, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
