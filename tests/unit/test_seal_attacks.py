"""A hostile master.sealed: its size fields are the attacker's until a chunk authenticates, so
each is bounded by the file's own size (and sane maxima) before anything of that size is read or
allocated, and the buffer for the plaintext is allocated only once chunk 0 has authenticated the
header. Every refusal is one line (a `SealError`), never a MemoryError."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from groupcover.package import seal
from groupcover.package.seal import SealError

ROOT = Path(__file__).resolve().parents[2]
KEY = bytes(range(32))


def forged_bundle(
    plaintext: int, chunk: int, chunks: int | None = None, tail: bytes = b""
) -> bytes:
    """A sealed file whose header claims these sizes, followed by `tail` (no real chunk)."""
    header = json.dumps(
        {"version": 1, "chunk_bytes": chunk, "plaintext_bytes": plaintext, "label": "",
         "chunks": max(1, -(-plaintext // chunk)) if chunks is None else chunks,
         "bundle": "00" * 16},
        sort_keys=True, separators=(",", ":"),
    ).encode()  # fmt: skip
    return seal.MAGIC + struct.pack("<I", len(header)) + header + tail


FORGED = [
    pytest.param(1 << 30, 4 << 20, id="1GiB-plaintext"),
    pytest.param(1 << 60, 4 << 20, id="2^60-plaintext"),
    pytest.param(1 << 60, 1 << 60, id="2^60-chunk"),
    pytest.param(10, 1 << 62, id="2^62-chunk-small-plaintext"),
]


@pytest.mark.parametrize(("plaintext", "chunk"), FORGED)
def test_forged_sizes_are_one_line_before_any_allocation(tmp_path: Path, plaintext: int,
                                                         chunk: int) -> None:  # fmt: skip
    path = tmp_path / "master.sealed"
    path.write_bytes(forged_bundle(plaintext, chunk, tail=bytes(64)))
    openers = (
        lambda: seal.open_file_into(path, KEY),
        lambda: seal.open_file(path, KEY),
        lambda: seal.open_bytes(path.read_bytes(), KEY),
        lambda: seal.header_of(path),
    )
    for opener in openers:
        with pytest.raises(SealError) as info:
            opener()
        assert "\n" not in str(info.value)


def test_a_forged_chunk_count_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "master.sealed"
    path.write_bytes(forged_bundle(100, 10, chunks=1 << 60, tail=bytes(64)))
    with pytest.raises(SealError, match="chunk count"):
        seal.open_file_into(path, KEY)


MEASURE = textwrap.dedent(
    """
    import resource, sys
    from pathlib import Path
    from groupcover.package import seal
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        seal.open_file_into(Path(sys.argv[1]), bytes(range(32)))
        print("opened")
    except seal.SealError as exc:
        print(exc)
    print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
    """
)


@pytest.mark.parametrize("sparse", [False, True], ids=["4KiB-file", "sparse-1GiB-file"])
def test_a_forged_1gib_size_does_not_grow_the_resident_set(tmp_path: Path, sparse: bool) -> None:
    """A 1 GiB plaintext size, in a 4 KiB file or in a sparse file of exactly the size the header
    implies (no disk used): refused with the peak resident set barely moved. A buffer of the
    claimed size, zero-filled, is 1 GiB resident; it may only be allocated once chunk 0 has
    authenticated the header."""
    path = tmp_path / "master.sealed"
    blob = forged_bundle(1 << 30, 4 << 20, tail=bytes(4096))
    path.write_bytes(blob)
    if sparse:
        header_end = len(blob) - 4096
        chunks = (1 << 30) // (4 << 20)
        with path.open("r+b") as f:
            f.truncate(header_end + chunks * (seal.NONCE_BYTES + seal.TAG_BYTES) + (1 << 30))
    done = subprocess.run([sys.executable, "-c", MEASURE, str(path)], capture_output=True,
                          text=True, cwd=ROOT, timeout=120, check=True)  # fmt: skip
    message, grown_mib = done.stdout.splitlines()
    assert message != "opened"
    if sparse:
        assert "chunk 0 failed authentication" in message
    assert int(grown_mib) < 64, f"peak RSS grew {grown_mib} MiB before: {message}"


def test_an_edited_header_is_refused_at_chunk_0(tmp_path: Path) -> None:
    """Sizes that match the file but another header (it is bound into every chunk's associated
    data): refused at chunk 0, a failed authentication."""
    real = seal.seal_bytes(bytes(5000), KEY, chunk_bytes=1000, label="abc")
    (length,) = struct.unpack_from("<I", real, 8)
    edited = real[12 : 12 + length].replace(b'"label":"abc"', b'"label":"xyz"')
    path = tmp_path / "master.sealed"
    path.write_bytes(real[:12] + edited + real[12 + length :])
    with pytest.raises(SealError, match="chunk 0 failed authentication"):
        seal.open_file_into(path, KEY)


def test_a_deeply_nested_sealed_header_is_one_line(tmp_path: Path) -> None:
    raw = b"[" * 60_000
    path = tmp_path / "master.sealed"
    path.write_bytes(seal.MAGIC + struct.pack("<I", len(raw)) + raw)
    with pytest.raises(SealError, match="not JSON"):
        seal.open_file_into(path, KEY)
