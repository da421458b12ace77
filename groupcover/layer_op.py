"""`LayerOp`: what the worker computes for one published layer (no bias, ever).

Its own module so that the transport (master side) and the worker import it without importing
each other; `groupcover.transport` re-exports it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

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
