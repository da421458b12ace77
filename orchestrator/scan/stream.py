"""Searching a byte stream: sampled every STRIDE bytes, bitmap hits looked up and confirmed against
the vector's bytes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO

from orchestrator.scan.common import (
    MIN_MATCH,
    STRIDE,
    WINDOW,
)
from orchestrator.scan.index import Index

if TYPE_CHECKING:
    import numpy as np
else:
    from orchestrator.scan.common import np

CHUNK = 32 << 20


@dataclass(frozen=True)
class Hit:
    file: str
    view: str  # raw | guest
    offset: int  # where the vector's first byte would be (may precede a partial match)
    tensor: str
    orientation: str
    index: int
    dtype: str
    matched: int  # contiguous bytes of the vector found
    length: int  # the vector's bytes


def _match_length(buf: memoryview, at: int, vector: np.ndarray, off: int) -> int:
    """Contiguous bytes of `vector` equal to `buf` around buf[at] (= vector[off])."""
    start = max(0, at - off)
    end = min(len(buf), at - off + vector.size)
    region = np.frombuffer(buf[start:end], np.uint8)
    ours = vector[start - (at - off) : start - (at - off) + region.size]
    equal = region == ours
    local = at - start
    if not equal[local : local + WINDOW].all():
        return 0
    forward = np.flatnonzero(~equal[local:])
    back = np.flatnonzero(~equal[:local][::-1])
    return (int(forward[0]) if forward.size else equal.size - local) + (
        int(back[0]) if back.size else local
    )


def scan_stream(read: Callable[[int], bytes], index: Index, name: str, view: str,
                base: int = 0) -> tuple[list[Hit], int]:  # fmt: skip
    """Scans what `read(n)` yields (n bytes, fewer at the end); offsets are reported as
    base + position. Returns (hits, bytes read)."""
    margin = index.margin
    buf = bytearray()
    buf_start = 0  # stream offset of buf[0]
    pos = 0  # next sampled offset to look at (a multiple of STRIDE)
    eof = False
    hits: dict[tuple[int, int], Hit] = {}
    total = 0
    while True:
        want = pos + CHUNK + margin - (buf_start + len(buf))
        if want > 0 and not eof:
            got = read(want)
            total += len(got)
            eof = len(got) < want
            buf += got
        end = buf_start + len(buf)
        limit = end - WINDOW if eof else min(pos + CHUNK, end - margin)
        if limit >= pos:
            first = pos - buf_start
            count = (limit - pos) // STRIDE + 1
            step = STRIDE // 8
            words = np.frombuffer(buf, "<u8", count=(count - 1) * step + 1, offset=first)[::step]
            found = [(first + int(k) * STRIDE, words[k]) for k in index.candidates(words)]
            del words  # no export of buf may outlive this block: it is resized below
            view_buf = memoryview(buf)
            try:
                for at, word in found:
                    lo = int(np.searchsorted(index.keys, word, side="left"))
                    hi = int(np.searchsorted(index.keys, word, side="right"))
                    for j in range(lo, min(hi, lo + 16)):
                        vid, off = int(index.vector[j]), int(index.offset[j])
                        vset, row = index.locate(vid)
                        matched = _match_length(view_buf, at, vset.data[row], off)
                        if matched >= MIN_MATCH:
                            where = base + buf_start + at - off
                            hits.setdefault((vid, where), Hit(
                                name, view, where, vset.tensor, vset.orientation, row,
                                vset.dtype, matched, vset.data.shape[1]))  # fmt: skip
            finally:
                view_buf.release()
            pos += count * STRIDE
        if eof and pos > end - WINDOW:
            break
        drop = max(0, pos - margin - buf_start)
        drop -= drop % STRIDE
        if drop:
            del buf[:drop]
            buf_start += drop
    return list(hits.values()), total


def file_reader(f: BinaryIO) -> Callable[[int], bytes]:
    return lambda n: f.read(n)
