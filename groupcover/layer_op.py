"""`LayerOp`: what the worker computes for one published layer (no bias, ever), and `apply_op`,
that computation.

Its own module so that the transport, the master side (masks, integrity checks, de-obfuscation)
and the worker share the op and its math without importing each other; `groupcover.transport`
re-exports `LayerOp`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

OpKind = Literal["linear", "conv1d", "conv2d"]


@dataclass(frozen=True)
class LayerOp:
    """What the worker computes for one published layer: no bias, ever."""

    kind: OpKind
    stride: tuple[int, ...] = (1,)
    padding: tuple[int, ...] = (0,)
    dilation: tuple[int, ...] = (1,)
    params: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class PublishedRef:
    """A published weight the worker loads from its own copy of a package's
    published.safetensors: which package, which tensor, and the SHA-256 it must have."""

    package_id: str  # 32 hex digits
    index: int  # the tensor's name in published.safetensors is str(index)
    sha256: str  # 64 hex digits
    shape: tuple[int, ...]
    file_dtype: str  # "float32": the dtype stored in the file


def apply_op(op: LayerOp, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """op(x, weight) without a bias: what the worker computes for one call.

    A linear op with `params["transposed"]` returns the same values and shape as `F.linear`, in
    features-first memory: the GEMM `W @ x^T` (same FLOPs) fills an `(out, rows)` buffer and the
    result is its transposed view.
    """
    groups = op.params.get("groups", 1)
    if op.kind == "linear":
        if op.params.get("transposed", 0):
            return linear_features_first(x, weight)
        return F.linear(x, weight)
    if op.kind == "conv1d":
        return F.conv1d(x, weight, None, op.stride, op.padding, op.dilation, groups)
    if op.kind == "conv2d":
        return F.conv2d(x, weight, None, op.stride, op.padding, op.dilation, groups)
    raise ValueError(f"unknown layer op kind {op.kind!r}")


def linear_features_first(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`F.linear(x, weight)` computed as `weight @ x^T` into features-first memory."""
    features = x.shape[-1]
    rows = x.reshape(-1, features)
    result = torch.mm(weight, rows.t())  # (out, rows), contiguous
    return result.t().view(*x.shape[:-1], weight.shape[0])
