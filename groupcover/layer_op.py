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

MODULUS = 1 << 32
HALF = 1 << 31
RESIDUE_DTYPE = torch.int32  # results of a quantized op (`params["quantum"]`): residues mod 2^32


@dataclass(frozen=True)
class LayerOp:
    """What the worker computes for one published layer: no bias, ever."""

    kind: OpKind
    stride: tuple[int, ...] = (1,)
    padding: tuple[int, ...] = (0,)
    dilation: tuple[int, ...] = (1,)
    params: dict[str, int] = field(default_factory=dict)  # groups, transposed, quantum


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

    With `params["quantum"]` = c (masked calls), x holds int32 residues: the op runs in the
    weight's dtype (float64) and returns round(y / 2^c) mod 2^32 as int32 (`to_residues`).

    A linear op with `params["transposed"]` returns the same values and shape as `F.linear`, in
    features-first memory: the GEMM `W @ x^T` (same FLOPs) fills an `(out, rows)` buffer and the
    result is its transposed view.
    """
    quantum = op.params.get("quantum")
    y = _float_op(op, x if quantum is None else x.to(weight.dtype), weight)
    return y if quantum is None else to_residues(y, quantum)


def _float_op(op: LayerOp, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
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


def unquantized(op: LayerOp) -> LayerOp:
    """The op with float results (the master's own local products of a masked layer)."""
    if "quantum" not in op.params:
        return op
    params = {k: v for k, v in op.params.items() if k != "quantum"}
    return LayerOp(op.kind, op.stride, op.padding, op.dilation, params)


def with_quantum(op: LayerOp, exponent: int) -> LayerOp:
    """The op of a masked layer: int32 residues in and out, result quantum 2^exponent."""
    return LayerOp(op.kind, op.stride, op.padding, op.dilation, {**op.params, "quantum": exponent})


def to_residues(y: torch.Tensor, exponent: int) -> torch.Tensor:
    """round(y / 2^exponent) mod 2^32 as int32 (two's complement), y float64, in y's layout.
    Exact but for the rounding: the power-of-two scaling, the rounding and the reduction are
    exact in float64 for |y| / 2^exponent < 2^53. What a masked call's worker returns
    (`groupcover.modular`)."""
    # int64 holds |y| / q < 2^63; narrowing to int32 keeps the low 32 bits (two's complement)
    return y.mul(2.0**-exponent).round_().to(torch.int64).to(RESIDUE_DTYPE)


def linear_features_first(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`F.linear(x, weight)` computed as `weight @ x^T` into features-first memory."""
    features = x.shape[-1]
    rows = x.reshape(-1, features)
    result = torch.mm(weight, rows.t())  # (out, rows), contiguous
    return result.t().view(*x.shape[:-1], weight.shape[0])
