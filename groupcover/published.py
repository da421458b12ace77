"""`published.safetensors`: the worker's obfuscated weights, one tensor per layer id, readable by
any safetensors reader; and the digests that tie each tensor to its package.

Readers here never map the file: each tensor is read with `readinto` into a fresh tensor (the
master reads one layer when it needs it, and page-cache pages of a read file do not count in its
resident set, as touched pages of a mapping would), and its SHA-256 is checked against the digest
the caller names (from the sealed bundle on the master, from the master's PUBLISH_REF on the
worker) before the tensor is returned.

A module of its own, below both `groupcover.package` (which writes the file) and the worker and
the payload audit (which read it and its digests), so neither needs the package folder.

The header is the host's to write (the guest's disk is the host's), so it is validated before any
of it is used: a header length within the file, UTF-8 JSON of bounded depth, string metadata,
and per tensor a known dtype, non-negative integer dimensions whose product (in Python integers,
no wrap-around) is exactly the length of its data, and offsets within the file. Anything else is
one `PublishedError` line, as `safetensors` itself refuses such files.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from groupcover.errors import PackageError

FORMAT = "gcvm-published-1"
MAX_HEADER = 1 << 26
_DTYPES = {"F32": torch.float32, "F64": torch.float64, "F16": torch.float16, "BF16": torch.bfloat16}
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}


class PublishedError(PackageError):
    """A published-weights file that is missing, malformed, or whose tensor does not match its
    digest."""

    exit_code = 2


class DigestMismatch(PublishedError):
    """A published tensor whose SHA-256 is not the one its package names."""


def tensor_digest(tensor: torch.Tensor) -> str:
    """SHA-256 (hex) of a tensor's little-endian bytes in row-major order."""
    data = tensor.detach().cpu().contiguous()
    return hashlib.sha256(_bytes_of(data)).hexdigest()


def _bytes_of(tensor: torch.Tensor) -> memoryview:
    if tensor.numel() == 0:
        return memoryview(b"")
    return tensor.reshape(-1).view(torch.uint8).numpy().data.cast("B")


def write_published(path: Path, tensors: dict[str, torch.Tensor], package_id: str) -> None:
    """Writes the safetensors file (metadata: format, package id)."""
    from safetensors.torch import save_file  # only the writer (protect) needs it, not the worker

    ready = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    save_file(ready, str(path), metadata={"format": FORMAT, "package_id": package_id})


@dataclass(frozen=True)
class Entry:
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute file offset
    end: int


class PublishedFile:
    """The header of one published-weights file, and checked reads of its tensors."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            with self.path.open("rb") as f:
                size = os.fstat(f.fileno()).st_size
                raw = f.read(8)
                if len(raw) != 8:
                    raise PublishedError(f"{self.path} is not a safetensors file (too short)")
                (length,) = struct.unpack("<Q", raw)
                if length > MAX_HEADER or 8 + length > size:
                    raise PublishedError(f"{self.path}: a safetensors header of {length} bytes "
                                         f"in a file of {size}")  # fmt: skip
                text = f.read(length)
        except OSError as exc:
            raise PublishedError(f"cannot read published weights {self.path}: "
                                 f"{exc.strerror or exc}") from None  # fmt: skip
        try:
            header = json.loads(text.decode("utf-8"))
        except (ValueError, RecursionError):  # not UTF-8, not JSON, or nested past the stack
            raise PublishedError(f"{self.path}: the safetensors header is not JSON") from None
        if not isinstance(header, dict):
            raise PublishedError(f"{self.path}: the safetensors header is not an object")
        meta = header.pop("__metadata__", None) or {}
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise PublishedError(f"{self.path}: the safetensors metadata is not an object of "
                                 "strings")  # fmt: skip
        self.metadata: dict[str, str] = dict(meta)
        self.package_id = self.metadata.get("package_id", "")
        base = 8 + length
        self.entries: dict[str, Entry] = {}
        for name, info in header.items():
            self.entries[name] = self._entry(name, info, base, size)

    def _entry(self, name: str, info: Any, base: int, size: int) -> Entry:
        """One tensor's entry, refused unless its shape is exactly its data's length in the
        file (a negative, boolean, fractional or astronomically large dimension included)."""

        def integers(value: Any, count: int | None = None) -> list[int] | None:
            if not isinstance(value, list) or (count is not None and len(value) != count):
                return None
            ok = all(type(v) is int and v >= 0 for v in value)  # bool is not a dimension
            return value if ok else None

        entry = info if isinstance(info, dict) else {}
        dtype_name = entry.get("dtype")
        dtype = _DTYPES.get(dtype_name) if isinstance(dtype_name, str) else None
        shape, offsets = integers(entry.get("shape")), integers(entry.get("data_offsets"), 2)
        if dtype is None or shape is None or offsets is None:
            raise PublishedError(f"{self.path}: tensor {name!r} has an unreadable entry "
                                 "(dtype, shape or data offsets)")  # fmt: skip
        start, end = offsets
        nbytes = math.prod(shape) * dtype.itemsize  # Python integers: no wrap-around
        if end - start != nbytes or start > end or base + end > size:
            raise PublishedError(
                f"{self.path}: tensor {name!r} of shape {_short(shape)} does not fit its data "
                f"({start}..{end} of a {size}-byte file)"
            )
        return Entry(dtype, tuple(shape), base + start, base + end)

    def read(self, name: str, digest: str | None = None) -> torch.Tensor:
        """The tensor, in a fresh buffer; with `digest`, refused unless its SHA-256 matches."""
        entry = self.entries.get(name)
        if entry is None:
            raise PublishedError(f"{self.path} holds no published tensor {name!r}")
        tensor = torch.empty(entry.shape, dtype=entry.dtype)
        view = _bytes_of(tensor)
        with self.path.open("rb") as f:
            f.seek(entry.start)
            got = f.readinto(view)
        if got != entry.end - entry.start:
            raise PublishedError(f"{self.path}: tensor {name!r} is truncated")
        if digest is not None:
            found = hashlib.sha256(view).hexdigest()
            if found != digest:
                raise DigestMismatch(
                    f"published tensor {name!r} in {self.path} has SHA-256 {found[:16]}..., "
                    f"its package names {digest[:16]}...",
                    hint="this copy of published.safetensors was altered or belongs to another "
                    "package; copy the package's own file again",
                )
        return tensor


def _short(shape: list[int]) -> str:
    text = str(shape)
    return text if len(text) <= 60 else text[:57] + "..."


def dtype_name(dtype: torch.dtype) -> str:
    return _NAMES[dtype]
