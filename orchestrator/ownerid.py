"""The owner's identities, kept in the owner folder, and the pins a cluster's guests boot with.

- the **broker identity** (`OWNER/broker-identity/`: `broker.key`, `broker.pem`): the key broker's
  TLS certificate and the key that signs its attestation tokens (`orchestrator.attest.identity`);
- the **package-signing key** (`OWNER/owner.key`, Ed25519, PKCS8 PEM, mode 0600; `owner.pub`):
  `protect --sign-key` signs every package with it.

`gcvm up` appends their pins to every guest's kernel command line
(`gcvm.broker_cert=<base64url DER> gcvm.owner_key=<base64url raw key>`), which a confidential
VM's launch measurement covers: the master then trusts no other broker and opens no package but
the owner's, whatever the host passes at run time. The encoding is the framework's
(`groupcover.trust`; the two packages do not import each other, a test checks they agree).

In production the owner folder lives on the owner's machine, not on the TEE host: here it is on
the host because `gcvm up --broker` runs the broker there (a demonstration convenience).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from orchestrator.attest.identity import b64url, cmdline_param, load_or_create
from orchestrator.errors import UsageError

OWNER_KEY_PARAM = "gcvm.owner_key"
BROKER_DIR = "broker-identity"
SIGNING_KEY = "owner.key"
SIGNING_PUB = "owner.pub"


@dataclass(frozen=True)
class OwnerIdentity:
    folder: Path  # the owner folder
    broker_cert: bytes  # DER
    owner_key: bytes  # raw Ed25519 public key

    @property
    def broker_dir(self) -> Path:
        return self.folder / BROKER_DIR

    @property
    def signing_key(self) -> Path:
        return self.folder / SIGNING_KEY

    @property
    def signing_pub(self) -> Path:
        return self.folder / SIGNING_PUB

    @property
    def cmdline(self) -> str:
        """The kernel command line parameters that pin both identities."""
        return f"{cmdline_param(self.broker_cert)} {OWNER_KEY_PARAM}={b64url(self.owner_key)}"

    def facts(self) -> dict[str, str]:
        """What a cluster's state records (fingerprints and the owner folder, no key)."""
        return {
            "owner": str(self.folder),
            "broker_cert_sha256": hashlib.sha256(self.broker_cert).hexdigest(),
            "owner_key": b64url(self.owner_key),
            "cmdline": self.cmdline,
        }


def ensure(folder: Path) -> OwnerIdentity:
    """The owner folder's identities, made on first use."""
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    broker = load_or_create(folder / BROKER_DIR)  # checked: key 0600, the certificate its own
    return OwnerIdentity(folder, broker.cert_der, _signing_key(folder))


def _signing_key(folder: Path) -> bytes:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )
    from cryptography.hazmat.primitives.serialization import (
        Encoding,
        NoEncryption,
        PrivateFormat,
        PublicFormat,
        load_pem_private_key,
    )

    path, pub = folder / SIGNING_KEY, folder / SIGNING_PUB
    if not path.exists():
        key = Ed25519PrivateKey.generate()
        data = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
    mode = path.lstat().st_mode
    if mode & 0o077:
        raise UsageError(f"the owner's signing key {path} is readable by others "
                         f"(mode {mode & 0o777:o})", hint=f"chmod 600 {path}")  # fmt: skip
    try:
        private = load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise UsageError(f"{path} is not a PEM private key: {exc}") from None
    if not isinstance(private, Ed25519PrivateKey):
        raise UsageError(f"{path} is not an Ed25519 key")
    public: Ed25519PublicKey = private.public_key()
    pem = public.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    if not pub.exists() or pub.read_bytes() != pem:
        pub.write_bytes(pem)
    return public.public_bytes(Encoding.Raw, PublicFormat.Raw)
