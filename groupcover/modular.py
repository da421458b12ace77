"""Fixed-point residues mod 2^32: how masked calls carry exact values in 32 bits each way.

A masked call sends `P = X + rho (mod 2^32)` as int32, where `X = round(x 2^INPUT_BITS / B)` is
the (prepared) input in fixed point, B a power-of-two bound on |x| set once per layer, and rho
uniform on all of Z/2^32: P is exactly uniform whatever x is (a one-time pad in that group).
The worker computes `y = op(P, W'')` in float64 and returns `Y = round(y / q) mod 2^32` as int32,
where the result quantum `q = 2^c` is a public function of the published weight alone
(`quantum_exponent`). The master subtracts `U = round(op(rho, W'') / q) mod 2^32` (drawn ahead
with rho) in wrapping int32 arithmetic: `Z = Y - U = op(X, W'') / q` up to one quantum per
element, because `|op(X, W'')| / q` stays below 2^30 for every input within its bound and below
2^31 up to twice it (`check_range`). Where `X + rho` wrapped around 2^32 (probability about
|X| / 2^32 per element), `P` lost `2^32 k` and the master adds `2^32 op(k, W'') / q` back for
those few elements (`wraps`, `correct_wraps`).

Why: the same exactness and hiding as a float64 payload (53-bit grid, mod 2R) in half the
bytes each way; the master's wire copies and passes over payloads halve too. Precision: the
input keeps INPUT_BITS bits below its bound B (float32 keeps 24 of its own value); a result
keeps RESULT_BITS bits below the bound of its layer's outputs, which is loose by about
sqrt(features) (Cauchy-Schwarz) times B / rms(x): about 2^-21 of a typical result.
"""

from __future__ import annotations

import math

import torch

from groupcover.errors import GroupCoverError
from groupcover.layer_op import HALF, MODULUS, LayerOp, apply_op, unquantized
from groupcover.tensorpass import memory_flat

INPUT_BITS = 22  # |X| <= 2^22 for |x| <= B
RESULT_BITS = 30  # convolutions: |op(X, W'')| / q <= 2^30 for every input with |x| <= B
LINEAR_RESULT_BITS = 31  # linear: <= 2^30 for |x| <= B / 2; beyond, each call's row norms say
EDGE_BITS = INPUT_BITS + 2  # mask entries within 2^EDGE_BITS of +-2^31 are where wraps can be


class MaskRangeError(GroupCoverError):
    """An input too large for its layer's masked range: its result would alias mod 2^32."""


def quantum_exponent(weight: torch.Tensor, op: LayerOp) -> int:
    """c with q = 2^c: |op(X, W'')| / q <= 2^RESULT_BITS for every X with |X| <= 2^INPUT_BITS.

    Linear: |X_t . W''_j| <= ||X_t||_2 ||W''_j||_2 <= 2^INPUT_BITS sqrt(in) max_j ||W''_j||_2,
    and the quantum takes LINEAR_RESULT_BITS: 2^30 covers every |x| <= B / 2 outright, and a
    call with larger inputs is measured by its rows' norms (`check_range`), which stay far below
    the worst case unless every element of a row sits at +-B: one bit of every result won.
    Convolutions: <= 2^INPUT_BITS max_j ||W''_j||_1 (any window). Public: the weight is."""
    rows = weight.detach().reshape(weight.shape[0], -1).to(torch.float64)
    if op.kind == "linear":
        bound = math.sqrt(rows.shape[1]) * float(rows.norm(dim=1).max())
    else:
        bound = float(rows.abs().sum(dim=1).max())
    bound = max(bound, 2.0**-60) * 2.0**INPUT_BITS
    bits = LINEAR_RESULT_BITS if op.kind == "linear" else RESULT_BITS
    return math.ceil(math.log2(bound)) - bits


def guaranteed_peak(op: LayerOp) -> float:
    """The largest max |X| whose results fit without looking at the input (`check_range`)."""
    return 2.0 ** (INPUT_BITS - 1) if op.kind == "linear" else 2.0**INPUT_BITS


def row_bounds(weight: torch.Tensor, op: LayerOp) -> float:
    """max_j ||W''_j||_2 (linear) or ||W''_j||_1 (convolutions): what `check_range` multiplies."""
    rows = weight.detach().reshape(weight.shape[0], -1).to(torch.float64)
    if op.kind == "linear":
        return float(rows.norm(dim=1).max())
    return float(rows.abs().sum(dim=1).max())


def quantize(x: torch.Tensor, scale: float) -> torch.Tensor:
    """round(x scale) in x's dtype and layout (scale a power of two: the product is exact)."""
    return x.mul(scale).round_()


def check_range(
    layer_id: str,
    peak: float,
    x_fixed: torch.Tensor | None,
    op: LayerOp,
    row_bound: float,
    exponent: int,
    widest: float | None = None,
) -> None:
    """Refuses an input whose result could exceed 2^31 quanta (and alias mod 2^32).

    `peak` = max |X|. Up to `guaranteed_peak` nothing is computed (`quantum_exponent` covers
    it); beyond, the bound is this input's: its widest row's norm (linear: `widest`, else from
    `x_fixed`) or its peak (convolutions), times the weight's `row_bound`. A NaN, an infinity
    or an X beyond int32 is refused whatever the bound."""
    if peak <= guaranteed_peak(op):
        return
    if not peak < 2.0**31:
        raise MaskRangeError(
            f"layer {layer_id!r}: an input is not finite or reaches "
            f"{peak / 2.0**INPUT_BITS:.3g} x the bound its masks were calibrated for",
            hint="fill the masks with example inputs as large as the ones you will run",
        )
    if op.kind == "linear":
        if widest is None:
            assert x_fixed is not None
            rows = (
                x_fixed.reshape(-1, x_fixed.shape[-1]) if x_fixed.dim() > 1 else x_fixed.view(1, -1)
            )
            widest = float(rows.to(torch.float64).norm(dim=1).max())
        reach = widest * row_bound
    else:
        reach = peak * row_bound
    if reach >= (HALF - 2**20) * 2.0**exponent:
        raise MaskRangeError(
            f"layer {layer_id!r}: an input reaches {peak / 2.0**INPUT_BITS:.3g} x the bound its "
            "masks were calibrated for; its masked result would not fit 32 bits",
            hint="fill the masks with example inputs as large as the ones you will run",
        )


def edges(rho: torch.Tensor) -> torch.Tensor:
    """Memory-order positions of rho where X + rho can wrap for any |X| <= 2^EDGE_BITS: the
    entries within 2^EDGE_BITS of +-2^31 (about 2^(EDGE_BITS - 31) of them)."""
    flat = memory_flat(rho)
    limit = HALF - (1 << EDGE_BITS)
    return torch.nonzero((flat >= limit) | (flat < -limit)).flatten()


def wraps(
    x_fixed: torch.Tensor, rho: torch.Tensor, near_edges: torch.Tensor | None, peak: float
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(memory-order positions, k) where X + rho left [-2^31, 2^31) and P lost 2^32 k; None
    when nothing wrapped. Only rho's edge entries can wrap while |X| <= 2^EDGE_BITS; a larger
    input is searched whole (slow, rare)."""
    flat_x, flat_rho = memory_flat(x_fixed), memory_flat(rho)
    if near_edges is None or peak > 2.0**EDGE_BITS:
        near_edges = torch.arange(flat_x.numel())
    if near_edges.numel() == 0:
        return None
    total = flat_x.index_select(0, near_edges).to(torch.int64)
    total += flat_rho.index_select(0, near_edges).to(torch.int64)
    k = torch.div(total + HALF, MODULUS, rounding_mode="floor")
    hit = torch.nonzero(k).flatten()
    if hit.numel() == 0:
        return None
    return near_edges.index_select(0, hit), k.index_select(0, hit)


def logical_index(t: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Memory-order positions of a dense tensor as per-dim index tensors (its logical index)."""
    index: list[torch.Tensor] = [torch.zeros_like(positions)] * t.dim()
    # a dimension of size 1 has index 0 whatever its stride (torch may give it any stride)
    dims = sorted((d for d in range(t.dim()) if t.shape[d] > 1), key=t.stride, reverse=True)
    rest = positions
    for d in dims:
        index[d] = torch.div(rest, t.stride(d), rounding_mode="floor")
        rest = rest - index[d] * t.stride(d)
    return tuple(index)


def correct_wraps(
    residues: torch.Tensor,
    like: torch.Tensor,
    positions: torch.Tensor,
    k: torch.Tensor,
    weight: torch.Tensor,
    op: LayerOp,
    exponent: int,
) -> torch.Tensor:
    """Adds round(2^32 op(k, W'') / q) mod 2^32 to the int32 residues y - u (the op's result
    layout) in place, wrapping: afterwards they are op(X, W'') / q. Only the wrapped input
    elements are used (`like` is the input whose memory order `positions` index), with the
    published weight W''. Returns how many wraps each output position took (each adds up to half a
    quantum of rounding)."""
    index = logical_index(like, positions)
    coef = k.to(torch.float64) * (float(MODULUS) * 2.0**-exponent)
    if op.kind == "linear":
        rows = math.prod(like.shape[:-1])
        row = torch.zeros_like(index[-1])
        for d, size in enumerate(like.shape[:-1]):
            row = row * size + index[d]
        columns = weight.index_select(1, index[-1]).t().to(torch.float64)  # (wraps, out)
        fix = _residues(columns.mul_(coef.unsqueeze(1)))  # per wrap, mod 2^32
        table = residues.view(rows, -1)  # a view in either layout
        if table.t().is_contiguous():  # features-first: whole columns of the (out, rows) table
            table.t().index_add_(1, row, fix.t())  # int32 adds wrap: any order, same bits
        else:
            table.index_add_(0, row, fix)
        return torch.bincount(row, minlength=rows).view(like.shape[:-1])
    # convolutions: the wrapped elements as a sparse input, one op over it
    sparse = torch.zeros(like.shape, dtype=torch.float64)
    sparse.index_put_(index, coef, accumulate=True)
    residues.add_(_residues(apply_op(unquantized(op), sparse, weight.to(torch.float64))))
    count = torch.zeros(like.shape, dtype=torch.float64)
    count.index_put_(index, torch.ones_like(coef), accumulate=True)
    footprint = apply_op(unquantized(op), count, torch.ones_like(weight[:1], dtype=torch.float64))
    return footprint.squeeze(1).round_().to(torch.int64)


def _residues(values: torch.Tensor) -> torch.Tensor:
    """round(values) mod 2^32 as int32 (float64 values, |values| < 2^63)."""
    return values.round_().to(torch.int64).to(torch.int32)
