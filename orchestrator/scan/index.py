"""The fingerprints of every vector of the targets (rows and columns, in each dtype): a bitmap and
sorted keys."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from orchestrator.scan.common import (
    DTYPES,
    MIN_DISTINCT,
    STRIDE,
    WINDOW,
    ScanInputError,
)
from orchestrator.scan.tensors import as_dtype_bytes

if TYPE_CHECKING:
    import numpy as np
else:
    from orchestrator.scan.common import np

_MULTIPLIERS = (0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0xD6E8FEB86659FD93)

ANCHOR = 512  # a vector's fingerprints start every ANCHOR bytes (STRIDE offsets each)


@dataclass
class VectorSet:
    """One tensor's rows or columns in one dtype: the bytes each vector has in a file."""

    tensor: str
    orientation: str  # row | column
    dtype: str
    data: np.ndarray  # (count, length) uint8
    base: int  # global id of vector 0


@dataclass
class Index:
    sets: list[VectorSet]
    keys: np.ndarray  # sorted uint64 fingerprints
    vector: np.ndarray  # int64 global vector id per key
    offset: np.ndarray  # int64 byte offset of the key in its vector
    bitmap: np.ndarray  # uint8, one bit per hash slot
    bits: int
    multiplier: int
    margin: int  # the longest vector, rounded up to STRIDE
    targets: dict[str, list[int]] = field(default_factory=dict)  # name -> shape

    def locate(self, vector_id: int) -> tuple[VectorSet, int]:
        bases = [s.base for s in self.sets]
        at = int(np.searchsorted(bases, vector_id, side="right")) - 1
        return self.sets[at], vector_id - self.sets[at].base

    def hash(self, words: np.ndarray) -> np.ndarray:
        return (words * np.uint64(self.multiplier)) >> np.uint64(64 - self.bits)

    def candidates(self, words: np.ndarray) -> np.ndarray:
        """Indices of words whose hash hits the bitmap."""
        slots = self.hash(words)
        byte = self.bitmap[slots >> np.uint64(3)]
        return np.flatnonzero((byte >> (slots & np.uint64(7)).astype(np.uint8)) & 1)


def _fingerprints(data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(keys, offsets) of a (count, length) uint8 block: windows at the STRIDE offsets after
    every ANCHOR bytes; keys (count, k), offsets (k,)."""
    length = data.shape[1]
    starts = [a + t for a in range(0, max(length - WINDOW - STRIDE, 0) + 1, ANCHOR)
              for t in range(STRIDE) if a + t + WINDOW <= length]  # fmt: skip
    offsets = np.array(starts, dtype=np.int64)
    windows = np.lib.stride_tricks.sliding_window_view(data, WINDOW, axis=1)[:, offsets, :]
    keys = np.ascontiguousarray(windows).view("<u8")[..., 0]
    return keys, offsets


def _distinct_enough(keys: np.ndarray) -> np.ndarray:
    as_bytes = np.sort(keys.view(np.uint8).reshape(-1, WINDOW), axis=1)
    return (np.count_nonzero(np.diff(as_bytes, axis=1), axis=1) + 1) >= MIN_DISTINCT


def build_index(targets: dict[str, np.ndarray], dtypes: Iterable[str] = DTYPES) -> Index:
    sets: list[VectorSet] = []
    base = 0
    for name, tensor in targets.items():
        matrix = tensor.reshape(tensor.shape[0], -1) if tensor.ndim >= 2 else tensor.reshape(1, -1)
        views = [("row", matrix)] + ([("column", matrix.T)] if tensor.ndim >= 2 else [])
        for orientation, values in views:
            for dtype in dtypes:
                data = as_dtype_bytes(values, dtype)
                if data.shape[1] < WINDOW + STRIDE:
                    continue
                sets.append(VectorSet(name, orientation, dtype, data, base))
                base += data.shape[0]
    if not sets:
        raise ScanInputError("the chosen tensors are too small to look for (< 24 bytes a row)")
    all_keys, all_vec, all_off = [], [], []
    for s in sets:
        keys, offsets = _fingerprints(s.data)
        vec = np.broadcast_to(np.arange(s.data.shape[0], dtype=np.int64)[:, None] + s.base,
                              keys.shape)  # fmt: skip
        off = np.broadcast_to(offsets[None, :], keys.shape)
        good = _distinct_enough(keys.ravel())
        all_keys.append(keys.ravel()[good])
        all_vec.append(vec.ravel()[good])
        all_off.append(off.ravel()[good])
    keys = np.concatenate(all_keys)
    order = np.argsort(keys, kind="stable")
    keys, vector, offset = (
        keys[order],
        np.concatenate(all_vec)[order],
        np.concatenate(all_off)[order],
    )
    bits = int(min(max(24, int(np.ceil(np.log2(max(keys.size, 1) * 64)))), 31))
    margin = -(-max(s.data.shape[1] for s in sets) // STRIDE) * STRIDE
    common = np.array([int.from_bytes(bytes([b]) * WINDOW, "little") for b in range(256)],
                      dtype=np.uint64)  # fmt: skip
    for multiplier in _MULTIPLIERS:
        index = Index(sets, keys, vector, offset, np.zeros(1 << (bits - 3), np.uint8), bits,
                      multiplier, margin)  # fmt: skip
        slots = index.hash(keys)
        np.bitwise_or.at(index.bitmap, slots >> np.uint64(3),
                         (1 << (slots & np.uint64(7))).astype(np.uint8))  # fmt: skip
        if index.candidates(common).size == 0:
            break
    index.targets = {n: list(t.shape) for n, t in targets.items()}
    return index
