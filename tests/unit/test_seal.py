"""The sealed bundle: round trip, and every kind of tampering or a wrong key refused."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

from groupcover.package import seal
from groupcover.package.seal import SealError

KEY = bytes(range(32))
PLAIN = os.urandom(10_000)


def sealed(chunk: int = 1024) -> bytes:
    return seal.seal_bytes(PLAIN, KEY, chunk_bytes=chunk, label="test")


@pytest.mark.parametrize("size", [0, 1, 1023, 1024, 1025, 10_000])
def test_round_trip(size: int) -> None:
    data = PLAIN[:size]
    assert seal.open_bytes(seal.seal_bytes(data, KEY, chunk_bytes=1024), KEY) == data


def test_file_round_trip_and_public_header(tmp_path: Path) -> None:
    path = tmp_path / "bundle.sealed"
    digest = seal.seal_file(path, PLAIN, KEY, chunk_bytes=4096, label="minilm")
    assert len(digest) == 64
    assert seal.open_file(path, KEY) == PLAIN
    header = seal.header_of(path)
    assert header["chunks"] == 3 and header["label"] == "minilm"
    assert PLAIN[:64] not in path.read_bytes()  # nothing of the plaintext in the clear


def test_two_seals_of_the_same_data_differ() -> None:
    assert sealed() != sealed()  # fresh nonces


def test_wrong_key_is_refused() -> None:
    with pytest.raises(SealError, match="chunk 0 failed authentication"):
        seal.open_bytes(sealed(), bytes(32))
    with pytest.raises(SealError, match="32 bytes"):
        seal.open_bytes(sealed(), b"short")


def _offsets(blob: bytes) -> tuple[int, int]:
    (length,) = struct.unpack_from("<I", blob, 8)
    return 12 + length, length


def test_a_flipped_byte_anywhere_is_refused() -> None:
    blob = sealed()
    start, _ = _offsets(blob)
    stride = 12 + 1024 + 16
    for position in (start + 3, start + 12 + 500, start + stride + 12 + 1, len(blob) - 1, 20):
        tampered = bytearray(blob)
        tampered[position] ^= 0x01
        with pytest.raises(SealError):
            seal.open_bytes(bytes(tampered), KEY)


def test_reordered_dropped_or_truncated_chunks_are_refused() -> None:
    blob = sealed()
    start, _ = _offsets(blob)
    stride = 12 + 1024 + 16
    head, body = blob[:start], blob[start:]
    chunks = [body[i : i + stride] for i in range(0, len(body), stride)]
    swapped = head + chunks[1] + chunks[0] + b"".join(chunks[2:])
    with pytest.raises(SealError, match="chunk 0 failed"):
        seal.open_bytes(swapped, KEY)
    with pytest.raises(SealError, match="truncated"):
        seal.open_bytes(head + b"".join(chunks[:-1]), KEY)
    with pytest.raises(SealError, match="trailing"):
        seal.open_bytes(blob + chunks[0], KEY)
    with pytest.raises(SealError, match="bad magic"):
        seal.open_bytes(b"nonsense" + blob[8:], KEY)


def test_a_chunk_from_another_bundle_is_refused() -> None:
    a, b = sealed(), sealed()
    start, _ = _offsets(a)
    stride = 12 + 1024 + 16
    mixed = a[: start + stride] + b[start + stride : start + 2 * stride] + a[start + 2 * stride :]
    with pytest.raises(SealError, match="chunk 1 failed"):
        seal.open_bytes(mixed, KEY)


def test_an_edited_header_is_refused() -> None:
    blob = sealed()
    edited = blob.replace(b'"label":"test"', b'"label":"evil"')
    assert edited != blob
    with pytest.raises(SealError, match="failed authentication"):
        seal.open_bytes(edited, KEY)
