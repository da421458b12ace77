"""Passes over a tensor's memory in the order it lies there, whatever its layout.

The master's hot path reduces large float64 tensors that are often features-first (a transposed
view of a contiguous buffer): a reduction over such a view walks memory with a large stride and
loses vectorisation, and `torch.linalg.vector_norm(ord=inf)` is a slow kernel in any layout
(about 12x a max over the same memory on one CPU thread). Both are avoided here.
"""

from __future__ import annotations

import torch


def dense_layout(t: torch.Tensor) -> bool:
    """Dense and non-overlapping: its strides are a permutation of a contiguous layout's."""
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride(), strict=True), key=lambda p: p[1]):
        if size == 1:
            continue
        if stride != expected:
            return False
        expected *= size
    return True


def memory_flat(t: torch.Tensor) -> torch.Tensor:
    """Every element of t once, as a 1-D tensor in memory order: a view for any dense layout
    (order of elements is the memory's, not the logical one), a copy otherwise."""
    if t.is_contiguous():
        return t.view(-1)
    if dense_layout(t):
        return t.as_strided((t.numel(),), (1,), t.storage_offset())
    return t.reshape(-1)


def abs_max(t: torch.Tensor) -> float:
    """max |t| in one read of t's memory and no temporary the size of t (0.0 for an empty t);
    NaN when t holds a NaN (max and min propagate it), inf when it holds an infinity."""
    if t.numel() == 0:
        return 0.0
    flat = memory_flat(t)
    high, low = float(flat.amax()), float(flat.amin())
    return max(high, -low)  # a NaN makes both NaN, and max(nan, nan) is nan


_RECEIVED_ABS_MAX = "_gcvm_received_abs_max"


def note_received_abs_max(t: torch.Tensor, value: float) -> None:
    """Records max |t| on a result a transport just received (its finiteness pass, a min and
    a max over the memory, found it), so that the integrity check needs no pass of its own."""
    setattr(t, _RECEIVED_ABS_MAX, value)


def received_abs_max(t: torch.Tensor) -> float:
    """max |t| of a worker's result not modified since it was received: the transport's note
    when it made one, else `abs_max` (one pass)."""
    known = getattr(t, _RECEIVED_ABS_MAX, None)
    return float(known) if known is not None else abs_max(t)
