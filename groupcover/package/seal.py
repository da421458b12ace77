"""The master's sealed bundle: chunked AES-256-GCM under a 256-bit model key.

File layout (all integers little-endian):

    magic  b"GCVMSEAL"  (8 bytes)
    u32    header length H
    H      header: canonical JSON {"version", "chunk_bytes", "chunks", "plaintext_bytes",
           "label", "bundle"}; "bundle" is a random id, so chunks of two bundles never share
           their associated data (no digest of the plaintext is published: GCM's tags are the
           integrity check)
    then per chunk i: 12-byte nonce | ciphertext of min(chunk_bytes, rest) bytes | 16-byte tag

Each chunk's associated data is SHA-256(magic | header) | u64 i | u8 last, so a chunk cannot be
moved, dropped, duplicated or taken from another bundle, the file cannot be truncated or
extended at a chunk boundary, and the header cannot be edited. Nonces are random (96 bits from
os.urandom): with one key per bundle, the number of chunks is far below the collision bound.
Decryption happens in memory only; nothing is written back in the clear.

Until a chunk authenticates, every number in the header is the attacker's: the sizes must add up
to the file's own size exactly (and a chunk is at most MAX_CHUNK) before anything is read or
allocated, and the plaintext's buffer is allocated only once chunk 0 (whose associated data binds
the header) has authenticated.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from groupcover.errors import GroupCoverError

MAGIC = b"GCVMSEAL"
VERSION = 1
KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
DEFAULT_CHUNK = 4 << 20
MAX_HEADER = 1 << 16
MAX_CHUNK = 1 << 30  # protect writes 4 MiB chunks; a larger one is not ours


class SealError(GroupCoverError):
    """A sealed bundle that cannot be opened: wrong key, tampered, truncated or not a bundle."""

    exit_code = 2


def new_key() -> bytes:
    """A fresh 256-bit model key from the operating system's CSPRNG."""
    return os.urandom(KEY_BYTES)


def _check_key(key: bytes) -> None:
    if not isinstance(key, bytes | bytearray) or len(key) != KEY_BYTES:
        raise SealError(
            f"a model key is {KEY_BYTES} bytes, not {len(key) if key else 0}",
            hint="use the model.key file written by `protect` (raw 32 bytes)",
        )


def _aad(header_digest: bytes, index: int, last: bool) -> bytes:
    return header_digest + struct.pack("<QB", index, 1 if last else 0)


def seal_bytes(plaintext: bytes, key: bytes, *, chunk_bytes: int = DEFAULT_CHUNK,
               label: str = "") -> bytes:  # fmt: skip
    """The sealed form of `plaintext` (see the module docstring)."""
    _check_key(key)
    if chunk_bytes <= 0:
        raise ValueError("chunk_bytes must be positive")
    chunks = max(1, -(-len(plaintext) // chunk_bytes))
    header = json.dumps(
        {
            "version": VERSION,
            "chunk_bytes": chunk_bytes,
            "chunks": chunks,
            "plaintext_bytes": len(plaintext),
            "label": label,
            "bundle": os.urandom(16).hex(),  # binds every chunk to this one bundle
        },
        sort_keys=True,
        separators=(",", ":"),
    ).encode()
    digest = hashlib.sha256(MAGIC + header).digest()
    aead = AESGCM(bytes(key))
    out = [MAGIC, struct.pack("<I", len(header)), header]
    view = memoryview(plaintext)
    for index in range(chunks):
        part = view[index * chunk_bytes : (index + 1) * chunk_bytes]
        nonce = os.urandom(NONCE_BYTES)
        out.append(nonce)
        out.append(aead.encrypt(nonce, bytes(part), _aad(digest, index, index == chunks - 1)))
    return b"".join(out)


def _header(blob: memoryview, file_bytes: int | None = None) -> tuple[dict, int, bytes]:
    """(header, offset of chunk 0, header digest). Its sizes are checked against the file's own
    size (`file_bytes`, default the blob's) before anything of that size is read or allocated:
    until a chunk authenticates, every number in the header is the attacker's."""
    if len(blob) < len(MAGIC) + 4 or bytes(blob[: len(MAGIC)]) != MAGIC:
        raise SealError("not a sealed gcvm bundle (bad magic)")
    (length,) = struct.unpack_from("<I", blob, len(MAGIC))
    start = len(MAGIC) + 4
    if length > MAX_HEADER or start + length > len(blob):
        raise SealError("sealed bundle header is truncated or too large")
    raw = bytes(blob[start : start + length])
    try:
        header = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError):
        raise SealError("sealed bundle header is not JSON") from None
    fields = {"version", "chunk_bytes", "chunks", "plaintext_bytes", "label", "bundle"}
    if not isinstance(header, dict) or set(header) != fields or header["version"] != VERSION:
        raise SealError("sealed bundle header has an unknown version or fields")
    chunk, chunks, size = header["chunk_bytes"], header["chunks"], header["plaintext_bytes"]
    if not all(type(v) is int and v >= 0 for v in (chunk, chunks, size)) or chunk == 0:
        raise SealError("sealed bundle header has invalid sizes")
    if chunk > MAX_CHUNK:
        raise SealError(f"sealed bundle header names chunks of {chunk} bytes (at most {MAX_CHUNK})")
    if chunks != max(1, -(-size // chunk)):
        raise SealError("sealed bundle header's chunk count does not match its size")
    total = len(blob) if file_bytes is None else file_bytes
    expected = start + length + chunks * (NONCE_BYTES + TAG_BYTES) + size
    if expected > total:
        raise SealError(f"sealed bundle is truncated: {total} bytes, its header says {expected}",
                        hint="copy the package's master.sealed again")  # fmt: skip
    if expected < total:
        raise SealError(f"sealed bundle has trailing bytes after its last chunk: {total} bytes, "
                        f"its header says {expected}")  # fmt: skip
    return header, start + length, hashlib.sha256(MAGIC + raw).digest()


def header_of(path: Path) -> dict:
    """The public header of a sealed bundle (no key needed; only the header is read)."""
    try:
        with path.open("rb") as f:
            return _read_header(f)[0]
    except OSError as exc:
        raise SealError(f"cannot read the sealed bundle {path}: {exc.strerror}") from None


def _read_header(f: BinaryIO, read: Any = None) -> tuple[dict, int, bytes]:
    """The header, every size bounded by the file's own size; `read`: a hash fed what was read."""
    start = f.read(len(MAGIC) + 4)
    if len(start) < len(MAGIC) + 4 or start[: len(MAGIC)] != MAGIC:
        raise SealError("not a sealed gcvm bundle (bad magic)")
    (length,) = struct.unpack_from("<I", start, len(MAGIC))
    if length > MAX_HEADER:
        raise SealError("sealed bundle header is truncated or too large")
    head = start + f.read(length)
    if read is not None:
        read.update(head)
    return _header(memoryview(head), os.fstat(f.fileno()).st_size)


def _chunks(blob: memoryview, header: dict, offset: int) -> Iterator[tuple[int, bytes, bytes]]:
    size, chunk = header["plaintext_bytes"], header["chunk_bytes"]
    for index in range(header["chunks"]):
        length = min(chunk, size - index * chunk) if size else 0
        end = offset + NONCE_BYTES + length + TAG_BYTES
        if end > len(blob):
            raise SealError(f"sealed bundle is truncated at chunk {index}")
        yield (
            index,
            bytes(blob[offset : offset + NONCE_BYTES]),
            bytes(blob[offset + NONCE_BYTES : end]),
        )
        offset = end
    if offset != len(blob):
        raise SealError("sealed bundle has trailing bytes after its last chunk")


def open_bytes(sealed: bytes | memoryview, key: bytes) -> bytes:
    """The plaintext of a sealed bundle, in memory; any tampering or a wrong key is refused."""
    _check_key(key)
    blob = memoryview(sealed)
    header, offset, digest = _header(blob)
    aead = AESGCM(bytes(key))
    out = bytearray()
    last = header["chunks"] - 1
    for index, nonce, body in _chunks(blob, header, offset):
        try:
            out += aead.decrypt(nonce, body, _aad(digest, index, index == last))
        except InvalidTag:
            raise SealError(
                f"sealed bundle chunk {index} failed authentication",
                hint="the bundle was altered, or this is not its model key",
            ) from None
    return bytes(out)


def seal_file(path: Path, plaintext: bytes, key: bytes, **options: object) -> str:
    """Writes the sealed bundle; returns the SHA-256 of the file (for the public manifest)."""
    sealed = seal_bytes(plaintext, key, **options)  # type: ignore[arg-type]
    path.write_bytes(sealed)
    return hashlib.sha256(sealed).hexdigest()


def open_file(path: Path, key: bytes) -> bytes:
    try:
        sealed = path.read_bytes()
    except OSError as exc:
        raise SealError(f"cannot read the sealed bundle {path}: {exc.strerror}") from None
    return open_bytes(sealed, key)


def open_file_into(path: Path, key: bytes, sha256: str | None = None) -> bytearray:
    """The plaintext of a sealed bundle file, decrypted chunk by chunk into one buffer: the
    master never holds the sealed file and its plaintext (nor a second copy) at once. With
    `sha256` (the digest the owner signed), the bytes decrypted must be the bytes signed: the
    file is hashed as it is read, and a file changed since its signature was checked is refused
    before the plaintext is returned."""
    _check_key(key)
    read = hashlib.sha256()
    try:
        f = path.open("rb")
    except OSError as exc:
        raise SealError(f"cannot read the sealed bundle {path}: {exc.strerror}") from None
    with f:
        header, _, digest = _read_header(f, read)  # every size bounded by the file's own size
        size, chunk, last = header["plaintext_bytes"], header["chunk_bytes"], header["chunks"] - 1
        aead = AESGCM(bytes(key))
        out = bytearray()
        for index in range(header["chunks"]):
            count = min(chunk, size - index * chunk) if size else 0
            body = f.read(NONCE_BYTES + count + TAG_BYTES)
            read.update(body)
            if len(body) != NONCE_BYTES + count + TAG_BYTES:
                raise SealError(f"sealed bundle is truncated at chunk {index}")
            try:
                plain = aead.decrypt(body[:NONCE_BYTES], body[NONCE_BYTES:],
                                     _aad(digest, index, index == last))  # fmt: skip
            except InvalidTag:
                raise SealError(
                    f"sealed bundle chunk {index} failed authentication",
                    hint="the bundle was altered, or this is not its model key",
                ) from None
            if index == 0:  # chunk 0 authenticated the header (its digest is in the AAD)
                out = bytearray(size)
            out[index * chunk : index * chunk + count] = plain
        if f.read(1):
            raise SealError("sealed bundle has trailing bytes after its last chunk")
    if sha256 is not None and read.hexdigest() != sha256:
        raise SealError(f"{path} changed after its signature was checked",
                        hint="the host altered the package while the master read it")  # fmt: skip
    return out
