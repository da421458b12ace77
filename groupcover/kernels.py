"""Fused passes for a masked linear call: one read of each tensor instead of one per torch op.

A masked call costs the master elementwise work on every payload and result element (fixed
point, mask, wraps, the check's dot products, unmasking, scaling), which torch does in a
dozen separate passes with temporaries. Here each side is one loop compiled by numba (LLVM),
in the tensors' own memory layout (row-major or features-first tables):

- `blind`: X = rint(x 2^22 / B), P = X + rho (wrapping int32), max |X|, and the check's
  `X . v` per row; then the wrapped elements, among the mask's edge entries;
- `correct`: the wraps' corrections added to the worker's residues in place (a row of W''^T
  per wrap);
- `unblind`: Z = Y - U (wrapping), max |Z|, the check's `s . Z` per row, and the output
  float32(Z) x factor.

Each kernel computes exactly what the torch path in `groupcover.masks` and
`groupcover.integrity` computes (the same integers; float sums in another order, inside the
check's tolerance): tests run both. Without numba (`available()` False), or for convolutions,
the torch path runs. Why numba: a well-kept JIT for exactly such loops, no compiler needed at
run time; kernels compile on first use (about a second each, cached per process).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

numba: Any
try:  # an optional accelerator: the framework runs without it
    import numba
except ImportError:  # pragma: no cover - exercised where numba is absent
    numba = None


def available() -> bool:
    return numba is not None


def _jit(function: Any) -> Any:
    if numba is None:
        return None
    return numba.njit(nogil=True, boundscheck=False, fastmath={"reassoc", "contract"})(function)


def _fixed_py(value, scale):
    # X = rint(x scale) as a float and as an int32 clamped to +-(2^31 - 1) (a NaN becomes
    # -(2^31 - 1)): a peak of 2^31 - 1 means "refuse or decide elsewhere"
    q = np.rint(np.float64(value) * scale)
    c = q if q > -2147483647.0 else -2147483647.0
    c = c if c < 2147483647.0 else 2147483647.0
    return q, np.int32(c)


# inlined into the kernels (numba's own inlining), so their loops still vectorise
_fixed = _fixed_py if numba is None else numba.njit(inline="always")(_fixed_py)


def _blind_rows(x, scale, rho, v, payload, rhs):
    # x (rows, n) float32, rho/payload (rows, n) int32, v (n,) float64, rhs (rows,) float64.
    # X as `_fixed` makes it; the peak is an integer max: it vectorises.
    rows, n = x.shape
    peak = np.int32(0)
    widest = 0.0  # the largest squared norm of a row of X
    for t in range(rows):
        acc = 0.0
        squares = 0.0
        for i in range(n):
            q, qi = _fixed(x[t, i], scale)
            a = np.int32(abs(qi))
            peak = a if a > peak else peak
            payload[t, i] = np.int32(qi + rho[t, i])  # wraps: the low 32 bits
            acc += q * v[i]
            squares += q * q
        rhs[t] = acc
        widest = max(widest, squares)
    return peak, widest


def _blind_features(x, scale, rho, v, payload, rhs):
    # x (n, rows) float32 features-first table, rho/payload alike, v (n,), rhs (rows,)
    n, rows = x.shape
    peak = np.int32(0)
    squares = np.zeros(rows, dtype=np.float64)
    for t in range(rows):
        rhs[t] = 0.0
    for i in range(n):
        vi = v[i]
        for t in range(rows):
            q, qi = _fixed(x[i, t], scale)
            a = np.int32(abs(qi))
            peak = a if a > peak else peak
            payload[i, t] = np.int32(qi + rho[i, t])
            rhs[t] += q * vi
            squares[t] += q * q
    widest = 0.0
    for t in range(rows):
        widest = max(widest, squares[t])
    return peak, widest


def _wraps(x, scale, rho, edges, wrap_pos, wrap_k):
    # x, rho: flat in the same memory order; edges: where rho can wrap (|X| <= 2^EDGE_BITS)
    count = 0
    for e in range(edges.shape[0]):
        pos = edges[e]
        total = np.int64(np.rint(np.float64(x[pos]) * scale)) + np.int64(rho[pos])
        if total >= 2147483648 or total < -2147483648:
            wrap_pos[count] = pos
            wrap_k[count] = (total + 2147483648) // 4294967296
            count += 1
    return count


def _correct(residues, out_first, in_first, rows, n, wrap_pos, wrap_k, weight_t, scale, counts):
    # residues: (rows, out) or, out_first, (out, rows) int32 table; positions in the input's
    # memory order ((rows, n), or, in_first, (n, rows)); weight_t: W''^T (n, out) row-major.
    # Per wrap: round(coef W''[:, i]) mod 2^32 added (wrapping) to its row: the reduction is
    # done in float64 first, so that the conversion and the add stay 32-bit (vectorised).
    out = weight_t.shape[1]
    wraps = wrap_pos.shape[0]
    fixes = np.empty((wraps, out), dtype=np.int32)
    t_of = np.empty(wraps, dtype=np.int64)
    for w in range(wraps):
        pos = wrap_pos[w]
        if in_first:
            i, t = pos // rows, pos % rows
        else:
            t, i = pos // n, pos % n
        t_of[w] = t
        coef = np.float64(wrap_k[w]) * scale
        counts[t] += 1
        for j in range(out):
            fix = np.rint(coef * np.float64(weight_t[i, j]))
            fix -= 4294967296.0 * np.floor(fix * 2.0**-32 + 0.5)  # into [-2^31, 2^31]
            fix = fix if fix < 2147483647.0 else fix - 4294967296.0
            fixes[w, j] = np.int32(fix)
    if out_first:  # row j of the (out, rows) table takes one value from each wrap
        for j in range(out):
            for w in range(wraps):
                residues[j, t_of[w]] = np.int32(residues[j, t_of[w]] + fixes[w, j])
    else:
        for w in range(wraps):
            t = t_of[w]
            for j in range(out):
                residues[t, j] = np.int32(residues[t, j] + fixes[w, j])


def _unblind_rows(y, u, s, factor, out, lhs):
    rows, m = y.shape
    peak = np.int64(0)
    for t in range(rows):
        acc = 0.0
        for j in range(m):
            z = np.int32(np.int64(y[t, j]) - np.int64(u[t, j]))  # wraps: the low 32 bits
            a = abs(np.int64(z))
            peak = a if a > peak else peak
            acc += s[j] * np.float64(z)
            out[t, j] = np.float32(np.float64(z) * factor)
        lhs[t] = acc
    return peak


def _unblind_features(y, u, s, factor, out, lhs):
    m, rows = y.shape
    peak = np.int64(0)
    for t in range(rows):
        lhs[t] = 0.0
    for j in range(m):
        sj = s[j]
        for t in range(rows):
            z = np.int32(np.int64(y[j, t]) - np.int64(u[j, t]))
            a = abs(np.int64(z))
            peak = a if a > peak else peak
            lhs[t] += sj * np.float64(z)
            out[j, t] = np.float32(np.float64(z) * factor)
    return peak


_KERNELS: dict[str, Any] = {}


def _kernel(name: str) -> Any:
    kernel = _KERNELS.get(name)
    if kernel is None:
        kernel = _jit(globals()[f"_{name}"])
        _KERNELS[name] = kernel
    return kernel


def table(t: torch.Tensor) -> tuple[torch.Tensor, bool] | None:
    """The 2-D memory table of a linear op's input or result, and whether it is features-first:
    (rows, features) for a row-major tensor, (features, rows) for a features-first one; None
    for any other layout. Always a view of t's memory (the kernels write through it)."""
    if t.dim() < 1:
        return None
    features = t.shape[-1]
    rows = math.prod(t.shape[:-1])
    if t.is_contiguous():
        return t.view(rows, features), False
    moved = t.movedim(-1, 0)
    if moved.is_contiguous():
        return moved.view(features, rows), True
    return None


def blind(
    x: torch.Tensor,
    scale: float,
    rho: torch.Tensor,
    edges: torch.Tensor | None,
    v: torch.Tensor,
    edge_bits: int,
) -> (
    tuple[torch.Tensor, torch.Tensor, float, float, tuple[torch.Tensor, torch.Tensor] | None] | None
):
    """(payload, rhs = X . v per row, max |X|, max_t ||X_t||, wraps as (memory positions, k)
    or None) for a
    linear op's float32 input x and its mask rho (same layout), the wraps found among rho's
    `edges`; None where the fused pass does not apply (no numba, another layout or dtype, an
    input beyond 2^edge_bits, a NaN or an infinity: the torch path decides those)."""
    if numba is None or edges is None or x.dtype != torch.float32 or v.dtype != torch.float64:
        return None
    if rho.dtype != torch.int32:
        return None
    x_table, rho_table = table(x), table(rho)
    if x_table is None or rho_table is None or x_table[1] != rho_table[1]:
        return None
    if x_table[0].shape != rho_table[0].shape:
        return None
    features_first = x_table[1]
    payload = torch.empty_like(rho)
    p_table = table(payload)
    if p_table is None or p_table[1] != features_first:
        return None
    rows = x_table[0].shape[1] if features_first else x_table[0].shape[0]
    rhs = torch.empty(rows, dtype=torch.float64)
    kernel = _kernel("blind_features" if features_first else "blind_rows")
    peak, widest = kernel(x_table[0].numpy(), scale, rho_table[0].numpy(),
                          v.reshape(-1).numpy(), p_table[0].numpy(), rhs.numpy())  # fmt: skip
    if peak > 2**edge_bits:  # NaN, infinite, beyond int32, or beyond the edges: torch path
        return None
    wrap_pos = np.empty(edges.numel(), dtype=np.int64)
    wrap_k = np.empty(edges.numel(), dtype=np.int64)
    count = _kernel("wraps")(x_table[0].reshape(-1).numpy(), scale,
                             rho_table[0].reshape(-1).numpy(), edges.numpy(), wrap_pos,
                             wrap_k)  # fmt: skip
    wraps = None
    if count:
        wraps = (torch.from_numpy(wrap_pos[:count]), torch.from_numpy(wrap_k[:count]))
    shape_rows = rhs.view(x.shape[:-1]) if x.dim() > 1 else rhs.view(())
    return payload, shape_rows, float(peak), math.sqrt(widest), wraps


def correct(
    residues: torch.Tensor,
    like: torch.Tensor,
    positions: torch.Tensor,
    k: torch.Tensor,
    weight_t: torch.Tensor,
    exponent: int,
) -> torch.Tensor | None:
    """`modular.correct_wraps` for a linear op, one row of `weight_t` (W''^T, (in, out)
    contiguous) per wrap; returns the wraps per row, or None where it does not apply."""
    if numba is None or not weight_t.is_contiguous() or residues.dtype != torch.int32:
        return None
    r_table, l_table = table(residues), table(like)
    if r_table is None or l_table is None:
        return None
    n = like.shape[-1]
    rows = like.numel() // n if n else 0
    counts = np.zeros(rows, dtype=np.int64)
    _kernel("correct")(r_table[0].numpy(), r_table[1], l_table[1], rows, n, positions.numpy(),
                       k.numpy(), weight_t.numpy(), float(1 << 32) * 2.0**-exponent,
                       counts)  # fmt: skip
    return torch.from_numpy(counts).view(like.shape[:-1])


def unblind(
    y: torch.Tensor, u: torch.Tensor, s: torch.Tensor, factor: float
) -> tuple[torch.Tensor, torch.Tensor, float] | None:
    """(the output float32(Y - U) x factor in y's layout, s . Z per row, max |Z|) for a
    linear op's residues; None where the fused pass does not apply."""
    if numba is None or s.dtype != torch.float64:
        return None
    y_table, u_table = table(y), table(u)
    if y_table is None or u_table is None or y_table[1] != u_table[1]:
        return None
    if y_table[0].shape != u_table[0].shape:
        return None
    features_first = y_table[1]
    out = torch.empty_like(y, dtype=torch.float32)
    o_table = table(out)
    if o_table is None or o_table[1] != features_first:
        return None
    rows = y_table[0].shape[1] if features_first else y_table[0].shape[0]
    lhs = torch.empty(rows, dtype=torch.float64)
    kernel = _kernel("unblind_features" if features_first else "unblind_rows")
    peak = kernel(y_table[0].numpy(), u_table[0].numpy(), s.numpy(), factor, o_table[0].numpy(),
                  lhs.numpy())  # fmt: skip
    return out, lhs.view(y.shape[:-1]) if y.dim() > 1 else lhs.view(()), float(peak)
