"""Who made a package: the owner's Ed25519 signature over its files, checked by the master before
it asks for the model key.

The owner makes one key pair (`python -m groupcover ownerkey --out DIR`): `owner.key` (private,
PEM PKCS8, mode 0600) never leaves the owner's machine; `owner.pub` (PEM SubjectPublicKeyInfo) is
what a master pins (`groupcover.trust`: `gcvm.owner_key=` on the measured kernel command line, or
`--owner-key` where nothing is measured). `protect --sign-key owner.key` or
`python -m groupcover sign DIR --sign-key owner.key` writes DIR/signature.json:

    {"format": 1, "algorithm": "Ed25519", "public_key": <base64url raw key>,
     "statement": {"context": "gcvm model package", "version": 1,
                   "files": {NAME: <SHA-256 hex>, ...}},
     "signature": <base64url signature over the statement's canonical JSON>}

The statement names every package file that exists (manifest.json, published.safetensors,
master.sealed, baselines.sealed) with its digest; model.key is never covered. The signed message
is the statement's canonical JSON (sorted keys, no spaces, ASCII), rebuilt by the verifier from
the parsed statement, so any change to the statement breaks the signature.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
    load_pem_private_key,
)

from groupcover.errors import UsageError
from groupcover.package.layout import BASELINES, MANIFEST, SIGNATURE, SIGNED_FILES, PackageError
from groupcover.trust import b64url

FORMAT = 1
ALGORITHM = "Ed25519"
CONTEXT = "gcvm model package"  # what the signed statement is about (never another message)
OWNER_PRIVATE, OWNER_PUBLIC = "owner.key", "owner.pub"
OPTIONAL = (BASELINES,)  # a signed file a copy may leave out (copied only for baseline modes)
SIGN_HINT = "sign it on the owner's machine: python -m groupcover sign DIR --sign-key owner.key"


class SignatureError(PackageError):
    """A package the pinned owner did not sign, or whose files differ from what was signed."""


def canonical(statement: dict[str, Any]) -> bytes:
    return json.dumps(statement, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _b64url_decode(text: object, what: str, path: Path) -> bytes:
    import base64
    import binascii

    if not isinstance(text, str):
        raise SignatureError(f"{path}: {what} is not a string")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise SignatureError(f"{path}: {what} is not base64url") from None


# ---- the owner's side: a key pair, and signing -------------------------------------------------


def generate_owner_key(out: Path) -> tuple[Path, Path, bytes]:
    """Writes OUT/owner.key (0600, never over an existing file) and OUT/owner.pub; returns both
    paths and the raw public key."""
    out = Path(out)
    private_path, public_path = out / OWNER_PRIVATE, out / OWNER_PUBLIC
    for path in (private_path, public_path):
        if path.exists():
            raise UsageError(f"{path} already exists: an owner key is never overwritten",
                             hint="packages signed with it would no longer open; choose another "
                             "--out")  # fmt: skip
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    public = key.public_key()
    _write_new(private_path, pem, 0o600)
    _write_new(public_path, public.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo),
               0o644)  # fmt: skip
    return private_path, public_path, public.public_bytes(Encoding.Raw, PublicFormat.Raw)


def _write_new(path: Path, data: bytes, mode: int) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise UsageError(f"{path} already exists: an owner key is never overwritten") from None
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def load_signing_key(path: Path) -> Ed25519PrivateKey:
    """The owner's private key; refused where group or others may read it."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
        data = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read the signing key {path}: {exc.strerror or exc}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise UsageError(f"the signing key {path} is open to group or others "
                         f"(mode {stat.S_IMODE(mode):o})",
                         hint=f"chmod 600 {path}")  # fmt: skip
    try:
        key = load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise UsageError(f"{path} is not an unencrypted PEM private key",
                         hint="give the owner.key written by `python -m groupcover ownerkey`"
                         ) from None  # fmt: skip
    if not isinstance(key, Ed25519PrivateKey):
        raise UsageError(f"{path} is not an Ed25519 private key")
    return key


def statement(root: Path) -> dict[str, Any]:
    """What the owner signs: every package file that exists, with its SHA-256."""
    files = {name: file_digest(root / name) for name in SIGNED_FILES if (root / name).is_file()}
    return {"context": CONTEXT, "version": FORMAT, "files": files}


def sign_package(root: Path, key: Ed25519PrivateKey) -> dict[str, Any]:
    """Writes ROOT/signature.json (atomically, replacing an older one); returns it."""
    root = Path(root)
    said = statement(root)
    public = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    document = {"format": FORMAT, "algorithm": ALGORITHM, "public_key": b64url(public),
                "statement": said, "signature": b64url(key.sign(canonical(said)))}  # fmt: skip
    temp = root / f".{SIGNATURE}.{os.getpid()}.tmp"
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(document, indent=2) + "\n")
        os.replace(temp, root / SIGNATURE)
    except BaseException:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise
    return document


# ---- the master's side -------------------------------------------------------------------------


def verify_package(root: Path, manifest_bytes: bytes, owner_key: bytes) -> dict[str, str]:
    """Checks ROOT/signature.json against the pinned owner key and every file against its signed
    digest; returns the signed digests (name -> SHA-256), which the master checks again on the
    bytes it then decrypts. `manifest_bytes` are the manifest's bytes as the master parsed them
    (not read again: the host could swap the file between the two reads)."""
    path = root / SIGNATURE
    owner = b64url(owner_key)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise SignatureError(
            f"package {root} is not signed, and this master opens only packages "
            f"signed by its owner key {owner}",
            hint=SIGN_HINT,
        ) from None
    except OSError as exc:
        raise SignatureError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        document = json.loads(raw)
    except ValueError:
        raise SignatureError(f"{path} is not JSON") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise SignatureError(f"{path}: unknown signature format")
    if document.get("algorithm") != ALGORITHM:
        raise SignatureError(f"{path}: algorithm {document.get('algorithm')!r}, not {ALGORITHM}")
    signer = _b64url_decode(document.get("public_key"), "public_key", path)
    if signer != owner_key:
        raise SignatureError(f"package {root} is signed by {b64url(signer)}, not by this "
                             f"master's owner key {owner}",
                             hint="only the pinned owner's packages run here")  # fmt: skip
    said = document.get("statement")
    if not isinstance(said, dict) or said.get("context") != CONTEXT:
        raise SignatureError(f"{path}: the statement is not a gcvm package statement")
    signature = _b64url_decode(document.get("signature"), "signature", path)
    try:
        Ed25519PublicKey.from_public_bytes(owner_key).verify(signature, canonical(said))
    except (InvalidSignature, ValueError):
        raise SignatureError(f"{path}: the owner's signature does not verify over its statement",
                             hint="the signature file was altered; sign the package again on "
                             "the owner's machine") from None  # fmt: skip
    files = said.get("files")
    if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
        raise SignatureError(f"{path}: the signed statement lists no files")
    unknown = sorted(set(files) - set(SIGNED_FILES))
    if unknown:
        raise SignatureError(f"{path}: the signed statement lists {unknown[0]}, not a package file")
    for name in SIGNED_FILES:
        present = (root / name).is_file()
        if name not in files:
            if present:
                raise SignatureError(f"package {root} holds {name}, which the owner's signature "
                                     "does not cover", hint=SIGN_HINT)  # fmt: skip
            continue
        if not present:
            if name in OPTIONAL:  # copied only where a baseline mode runs
                continue
            raise SignatureError(f"package {root} has no {name}, which the owner signed")
        # The manifest: the bytes already parsed. The sealed files: hashed here, before the key
        # is asked for, and again while they are decrypted (seal.open_file_into(sha256=...)).
        # published.safetensors: hashed here; every tensor the master later reads from it is
        # checked against the digest sealed inside the bundle (runtime: PublishedFile.read).
        digest = (hashlib.sha256(manifest_bytes).hexdigest() if name == MANIFEST
                  else file_digest(root / name))  # fmt: skip
        if digest != files[name]:
            raise SignatureError(f"{root / name} differs from the file the owner signed",
                                 hint="the package was altered after it was signed")  # fmt: skip
    return dict(files)
