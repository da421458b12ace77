"""Integrity of the worker's results: a Freivalds-style check per call, a secret vector per layer.

For a layer whose published weight is W'' (out rows), the master draws once a secret vector s
(one entry per output feature, |s_j| uniform in [1, 2) with a random sign, from `SecretRandom`)
and precomputes v = s^T W'' (a one-output layer of the same op). For every call with payload x_b
and result y_b it checks, per output position (a row of a linear layer, a pixel of a conv),

    | sum_j s_j y_b[.., j, ..] - op(x_b, v) |  <=  SLACK x eps(dtype) x op(|x_b|, |s|^T |W''|)

The right side bounds the rounding of both sides: every term of y_b's sums and of the check's is
at most |x_b| |W''| |s| in magnitude, so the float error of the difference is a small multiple of
eps times their sum. An honest CPU worker stays below 0.14 x eps x bound on MiniLM's shapes, in
float32 and float64, linear and conv (`LayerCheck.worst` records the largest ratio seen), so
`SLACK` = 8 leaves a margin of about 50 for other summation orders (cuBLAS, cuDNN; TF32 must be
off on a GPU worker, or float32 results are not what the layer computes). A wrong element
y_b[j] + d moves the left side by d s_j, with |s_j| >= 1: any single error above the tolerance
is caught with certainty, and an error spread over several elements passes only if it is
nearly orthogonal to the secret s, which the worker never sees. The check costs a contraction
of the result with s and two one-output ops over the input (about 3/out of the layer's FLOPs,
plus passes over x and y), no second matmul. It is on by default (`--no-verify` turns it off).

What it catches (tau_b: the tolerance of output position b, rho_b: the honest residual there,
|rho_b| <= `worst` x tau_b, about 0.02 tau_b on a CPU):

- Coverage: every element of every result enters the contraction, with weight |s_j| >= 1;
  nothing is sampled (no row, no element).
- One element changed by d: the residual moves by d s_j, so |d| > (1 + worst) tau_b, and any
  |d| > 2 tau_b, is caught with certainty.
- A change e spread over one output position's elements, chosen without knowing s, passes only
  if s.e falls in an interval of length 2 tau_b. Given the rest of s, the entry k with the
  largest |e_k| must fall in an interval of length 2 tau_b / |e_k|, and |s_k| is uniform on the
  grid of [1, 2) in its dtype (spacing eps): P(pass) <= 2 tau_b / max|e| + eps (2^-23 float32,
  2^-52 float64). A change over several positions passes with at most the smallest of their
  bounds. (With exact arithmetic and continuous s, any e != 0 would be caught with probability
  1; the tolerance is what costs the 2 tau_b / max|e|.)
- How large tau is: tau_b <= 2 SLACK eps sum_j sum_i |x_bi W''_ji| (|s_j| < 2), so relative to
  the result, tau_b / max|y| <= 16 eps x out x kappa, kappa = max_j sum_i |x_bi W''_ji| / max|y|
  (the cancellation inside the sums, >= 1). Each run records the largest tau_b / max|y| it saw
  (`loosest_tolerance`, printed with every result). MiniLM at batch 2 x 16: float32 unmasked
  modes 4.5e-3, so a change of one element by up to ~0.5% of the result's largest value can
  pass (measured: 1e-3 passes, 1e-2 is caught). Masked modes check the unmasked result in
  whole quanta (`check_quanta`): its tolerance is the worst case of the two roundings to
  quanta, about sum_j |s_j| quanta, 6e-4 to 1.1e-3 of a result's largest value on MiniLM;
  one residue moved by 1e-6 x 2^31 quanta is caught, by 1e-7 x 2^31 passes and moves the
  output no more than honest rounding does (1e-5 mask-only, 5e-5 groupcover, 4e-6 hardened).
  `python -m groupcover.measure.integrity_escape` measures this per mode.
- The float32 gap is the worker's own float32 rounding, which the tolerance must admit: checking
  in float64 would remove only the check's share of the rounding, not the worker's, so it does
  not close it. A smaller SLACK would (honest residuals use ~2% of the tolerance on a CPU), but
  needs GPU summation orders measured first. Where a 0.5% change of one element matters, use a
  masked mode (its results are exact to one quantum).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from groupcover.errors import IntegrityError
from groupcover.layer_op import apply_op
from groupcover.masks import Blinded, Unblinded
from groupcover.rng import SecretRandom
from groupcover.tensorpass import received_abs_max
from groupcover.transport import LayerOp

SLACK = 8.0
EPS64 = torch.finfo(torch.float64).eps


def _plain(op: LayerOp) -> LayerOp:
    """The op with its natural result layout (the check contracts whatever layout it gets),
    float results (a masked layer's check works on the unmasked quanta)."""
    params = {k: v for k, v in op.params.items() if k not in ("transposed", "quantum")}
    return replace(op, params=params)


def _row_dot(t: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """t @ w over the last axis, in t's own memory layout: a features-first t (the transposed
    linear op's result, or the input of a layer fed by one) is one GEMV over its contiguous
    (features, rows) table, with no copy to row-major."""
    table = t.movedim(-1, 0)
    if t.dim() >= 2 and not t.is_contiguous() and table.is_contiguous():
        return (w @ table.reshape(t.shape[-1], -1)).view(t.shape[:-1])
    return torch.matmul(t, w)


@dataclass
class LayerCheck:
    """The secret check of one layer: s (out,), v = s^T W'' and |s|^T |W''| as 1-output weights."""

    layer_id: str
    op: LayerOp
    s: torch.Tensor
    v: torch.Tensor
    v_abs: torch.Tensor
    slack: float = SLACK
    quantum: int | None = None  # masked layers: results are checked in quanta of 2^quantum
    rounding: float = 0.0  # masked layers: per element, the quanta two roundings may move
    s_abs_sum: float = 0.0  # masked layers' tolerance: sum_j |s_j| ...
    v_abs_sum: float = 0.0  # ... and sum_i |v|_i / q
    checked: int = 0
    seconds: float = 0.0
    worst: float = 0.0  # the largest residual / tolerance seen on passing calls
    loosest: float = 0.0  # the largest tolerance / max |y| of its result seen (passing calls)

    @classmethod
    def create(
        cls, layer_id: str, weight: torch.Tensor, op: LayerOp, rng: SecretRandom
    ) -> LayerCheck:
        out = weight.shape[0]
        s = (rng.signs(out) * rng.uniform(out, 1.0, 2.0)).to(weight.dtype)
        shape = (out,) + (1,) * (weight.dim() - 1)
        w = weight.detach()
        v = (s.view(shape) * w).sum(dim=0, keepdim=True)
        v_abs = (s.abs().view(shape) * w.abs()).sum(dim=0, keepdim=True)
        quantum = op.params.get("quantum")
        if quantum is None:
            return cls(layer_id, _plain(op), s, v, v_abs)
        # masked: z = op(X, W'') / q up to the roundings of Y and U (half a quantum each) and
        # the float64 products behind them (|P|, |rho| < 2^31: n eps 2^31 ||W''_j||_1 / q)
        fan_in = w[0].numel()
        products = fan_in * torch.finfo(torch.float64).eps * 2.0**31 * 2.0**-quantum
        worst_row = float(w.reshape(out, -1).abs().sum(dim=1).max())
        # ... and the check's own sum s . z (|z| < 2^31): out eps 2^31 per unit of sum |s|
        rounding = 1.0 + 2 * products * worst_row + out * torch.finfo(torch.float64).eps * 2.0**31
        scale = 2.0**-quantum
        return cls(layer_id, _plain(op), s, v * scale, v_abs * scale, quantum=quantum,
                   rounding=rounding, s_abs_sum=float(s.abs().sum()),
                   v_abs_sum=float(v_abs.sum()) * scale)  # fmt: skip

    def _contract(self, y: torch.Tensor) -> torch.Tensor:
        """sum_j s_j y[.., j, ..]: over the last axis (linear) or axis 1 (convolutions)."""
        if self.op.kind == "linear":
            return _row_dot(y, self.s)
        return torch.tensordot(y, self.s, dims=([1], [0]))

    def _one_output(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if self.op.kind == "linear":
            return _row_dot(x, weight.view(-1))
        return apply_op(self.op, x, weight).squeeze(1)

    def check(self, x: torch.Tensor, y: torch.Tensor, worker: str = "the worker") -> None:
        """Raises `IntegrityError` unless y is op(x, W'') up to float rounding."""
        start = time.perf_counter()
        try:
            with torch.no_grad():
                self._check(x, y, worker)
        finally:
            self.checked += 1
            self.seconds += time.perf_counter() - start

    def check_quanta(
        self,
        blinded: Blinded,
        result: Unblinded,
        worker: str = "the worker",
        mask_worker: str | None = None,
    ) -> None:
        """A masked call: the unmasked result must be op(X, W'') in quanta, X the fixed-point
        input; s . Z and X . v / q come from the fused passes where they ran.

        Per output position: |s . z - op(X, v / q)| <= (1 + products) sum_j |s_j| + SLACK eps
        max|X| sum_i |v|_i / q, plus half a quantum x sum_j |s_j| per wrap corrected there:
        the two roundings to whole quanta (Y by the worker, U here), the float64 products
        behind them, and this check's own float64 sums (bounded with the input's peak: no pass
        over |X|). Raises `IntegrityError` (naming both workers of a `-2w` call: z is their
        joint result)."""
        start = time.perf_counter()
        try:
            with torch.no_grad():
                lhs = result.lhs
                if lhs is None:
                    assert result.quanta is not None
                    lhs = self._contract(result.quanta)
                rhs = blinded.rhs
                if rhs is None:
                    assert blinded.fixed is not None
                    rhs = self._one_output(blinded.fixed.to(torch.float64), self.v)
                tolerance = (self.rounding * self.s_abs_sum
                             + self.slack * EPS64 * blinded.peak * self.v_abs_sum)  # fmt: skip
                bound = torch.full_like(lhs, tolerance)
                if result.wraps is not None:
                    bound.add_(result.wraps.to(bound.dtype).reshape(bound.shape),
                               alpha=0.5 * self.s_abs_sum)  # fmt: skip
                who = worker if mask_worker is None else f"{worker} or {mask_worker}"
                # a copy: `_judge` works in place, and the result's own sums stay readable
                self._judge(lhs.clone(), rhs, bound, result.peak, who, scaled=True)
        finally:
            self.checked += 1 if mask_worker is None else 2
            self.seconds += time.perf_counter() - start

    def _check_dtypes(self, x: torch.Tensor, y: torch.Tensor, worker: str) -> None:
        if x.dtype != self.v.dtype or y.dtype != self.s.dtype:
            raise IntegrityError(
                f"{worker}: layer {self.layer_id!r} got a result of dtype {y.dtype} for a "
                f"{self.v.dtype} layer"
            )

    def _check(self, x: torch.Tensor, y: torch.Tensor, worker: str) -> None:
        self._check_dtypes(x, y, worker)
        lhs = self._contract(y)
        rhs = self._one_output(x, self.v)
        bound = self._one_output(x.abs(), self.v_abs)
        scale = received_abs_max(y)  # noted by the wire's finiteness pass, else one pass
        self._judge(lhs, rhs, bound, scale, worker)

    def _judge(
        self,
        lhs: torch.Tensor,
        rhs: torch.Tensor,
        bound: torch.Tensor,
        scale: float,
        worker: str,
        *,
        scaled: bool = False,
    ) -> None:
        """|lhs - rhs| against SLACK x eps x bound per output position (`scaled`: the bound is
        the tolerance already); raises on a failure."""
        eps = torch.finfo(self.s.dtype).eps
        tolerance = bound if scaled else bound.mul_(self.slack * eps)
        tolerance = tolerance.add_(torch.finfo(self.s.dtype).tiny)
        loosest = float(tolerance.max()) / scale if scale > 0 and tolerance.numel() else 0.0
        residual = lhs.sub_(rhs).abs_()
        ratio = residual.div_(tolerance)
        worst = float(ratio.max()) if ratio.numel() else 0.0
        if not worst <= 1.0:  # also NaN, an infinite result or an infinite bound
            where = int(torch.nan_to_num(ratio, nan=float("inf")).argmax())
            raise IntegrityError(
                f"{worker}: layer {self.layer_id!r} returned a wrong result (integrity check "
                f"failed at output position {where}: residual {worst:.3g}x the rounding bound)",
                hint="the worker computed something else than the published layer",
            )
        self.worst = max(self.worst, worst)
        self.loosest = max(self.loosest, loosest)

    def stats(self) -> dict[str, float]:
        return {"checked": self.checked, "seconds": self.seconds, "worst_ratio": self.worst,
                "loosest_tolerance": self.loosest}  # fmt: skip


NOT_CHECKED = "results NOT checked (--no-verify): a worker can change any result unnoticed"


def checked_label(stats: dict[str, object]) -> str:
    """What the checks of a run (`ProtectedModel.integrity_stats()`) guarantee, in one line."""
    loosest = float(stats.get("loosest_tolerance") or 0.0)  # type: ignore[arg-type]
    grid = float(stats.get("grid") or torch.finfo(torch.float32).eps)  # type: ignore[arg-type]
    slack = float(stats.get("slack") or SLACK)  # type: ignore[arg-type]
    tolerance = f"{slack:g} x eps x |x| |s|^T |W''|"
    if stats.get("residues"):  # masked calls: their results are whole quanta mod 2^32
        tolerance = "one quantum x sum |s| (the two roundings of residues mod 2^32)"
    return (
        f"results checked (Freivalds: every element of every result; tolerance {tolerance} "
        f"per output position, at most {loosest:.1e} of a result's largest "
        f"value in this run; false-accept: 0 for one element changed by more than 2 x "
        f"tolerance, <= 2 x tolerance / max|error| + 2^{round(math.log2(grid))} per output "
        "position otherwise)"
    )


MINILM_SHAPES: tuple[tuple[int, int], ...] = ((384, 1152), (384, 384), (384, 1536), (1536, 384))


def _median_ms(fn: Callable[[], object], repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        start = time.thread_time()
        fn()
        times.append((time.thread_time() - start) * 1e3)
    return statistics.median(times)


def bench_integrity(
    shapes: tuple[tuple[int, int], ...] = MINILM_SHAPES,
    batch: int = 8,
    seq: int = 128,
    repeat: int = 10,
    *,
    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float64),
    threads: int = 1,
) -> list[dict[str, float | str]]:
    """Per (in, out) shape and dtype: median ms (this thread's CPU time, `threads` torch
    threads) of the worker's op and of the integrity check of its result, and their ratio.

    MiniLM's shapes by default (fused QKV, attention output, FFN1, FFN2 at batch 8 x 128);
    float32 is what unmasked modes check; float64 is the dtype of a masked layer's products.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        generator = torch.Generator().manual_seed(0)  # data, not secrets
        rng = SecretRandom.from_seed(0)
        op = LayerOp("linear", params={"transposed": 1})
        rows: list[dict[str, float | str]] = []
        for dtype in dtypes:
            for in_features, out_features in shapes:
                weight = torch.randn(out_features, in_features, generator=generator).to(dtype)
                x = torch.randn(batch, seq, in_features, generator=generator).to(dtype)
                check = LayerCheck.create("bench", weight, op, rng.spawn(f"{in_features}"))
                y = apply_op(op, x, weight)
                layer_ms = _median_ms(lambda: apply_op(op, x, weight), repeat)  # noqa: B023
                check_ms = _median_ms(lambda: check.check(x, y), repeat)  # noqa: B023
                rows.append(
                    {
                        "dtype": str(dtype).removeprefix("torch."),
                        "in_features": in_features,
                        "out_features": out_features,
                        "layer_ms": layer_ms,
                        "check_ms": check_ms,
                        "ratio": check_ms / layer_ms,
                    }
                )
        return rows
    finally:
        torch.set_num_threads(previous)
