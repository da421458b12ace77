"""The identities a master trusts, and where it learns them: the measured boot.

Two pins:

- the **broker's certificate** (DER): the only trust anchor of the TLS channel to the key broker,
  and the key that must have signed the broker's attestation token;
- the **owner's package-signing key** (a raw 32-byte Ed25519 public key): every package the
  master opens must carry the owner's signature over its files, checked before any sealed byte
  is decrypted and before any of its code runs.

Where they come from, and who can change them:

- the **kernel command line** (`/proc/cmdline`), as `gcvm.broker_cert=<base64url DER>` and
  `gcvm.owner_key=<base64url raw key>`. A confidential VM's command line is part of its launch
  measurement (SEV-SNP measures the direct-boot kernel, initrd and command line through the
  firmware's kernel hashes; TDX extends it into RTMR2), so a host that edits a pin launches a
  guest the owner's broker policy does not accept: it can run its own guest, never the owner's
  with another broker or another owner;
- the **framework's command line** (`--broker-cert FILE`, `--owner-key FILE`): accepted only where
  the measured boot pins nothing (a developer's machine, a test), and refused where it differs
  from a measured pin: argv, the environment, the package folder and SSH are the host's.

`Pins.source` says which, and every result carries it.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from pathlib import Path

from groupcover.errors import GroupCoverError

BROKER_CERT_PARAM = "gcvm.broker_cert"
OWNER_KEY_PARAM = "gcvm.owner_key"
KERNEL_CMDLINE = Path("/proc/cmdline")  # the measured boot's parameters (a VM)
OWNER_KEY_BYTES = 32  # Ed25519
MAX_CERT_BYTES = 4096

MEASURED = "kernel command line (measured)"
GIVEN = "command line (not measured)"
NONE = "none"


class TrustError(GroupCoverError):
    """A pin is malformed, or the host tried to replace a measured pin."""

    exit_code = 2


@dataclass(frozen=True)
class Pins:
    broker_cert: bytes | None = None  # DER
    owner_key: bytes | None = None  # raw Ed25519 public key
    source: str = NONE  # MEASURED, GIVEN or NONE

    @property
    def measured(self) -> bool:
        return self.source == MEASURED

    def facts(self) -> dict[str, object]:
        """For a result's JSON: what was pinned, and from where (fingerprints, not keys)."""
        import hashlib

        return {
            "source": self.source,
            "broker_cert_sha256": (
                hashlib.sha256(self.broker_cert).hexdigest() if self.broker_cert else None
            ),
            "owner_key": b64url(self.owner_key) if self.owner_key else None,
        }


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _b64url_decode(text: str, what: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise TrustError(f"{what} is not base64url") from None


def cmdline_params(broker_cert: bytes | None, owner_key: bytes | None) -> str:
    """The kernel command line parameters that pin these identities (what the owner measures)."""
    params = []
    if broker_cert is not None:
        params.append(f"{BROKER_CERT_PARAM}={b64url(_check_cert(broker_cert, 'broker pin'))}")
    if owner_key is not None:
        params.append(f"{OWNER_KEY_PARAM}={b64url(_check_owner(owner_key, 'owner pin'))}")
    return " ".join(params)


def parse_cmdline(text: str) -> Pins:
    """The pins in a kernel command line. A parameter given twice is refused (the kernel hands
    both to userspace; which one a reader takes is not something to leave to chance)."""
    found: dict[str, str] = {}
    for word in text.split():
        name, _, value = word.partition("=")
        if name in (BROKER_CERT_PARAM, OWNER_KEY_PARAM):
            if name in found:
                raise TrustError(f"the kernel command line gives {name} twice")
            found[name] = value
    if not found:
        return Pins()
    cert = found.get(BROKER_CERT_PARAM)
    owner = found.get(OWNER_KEY_PARAM)
    return Pins(
        _check_cert(_b64url_decode(cert, BROKER_CERT_PARAM), BROKER_CERT_PARAM) if cert else None,
        _check_owner(_b64url_decode(owner, OWNER_KEY_PARAM), OWNER_KEY_PARAM) if owner else None,
        MEASURED,
    )


def measured_pins(path: Path | None = None) -> Pins:
    """The pins of this boot (none where the file is absent: not a Linux guest)."""
    path = path or KERNEL_CMDLINE
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return Pins()
    return parse_cmdline(text)


def resolve(
    broker_cert_file: Path | None = None,
    owner_key_file: Path | None = None,
    measured: Pins | None = None,
) -> Pins:
    """The pins this master uses: the measured ones; a file given on the command line only where
    the measured boot pins nothing, and never one that differs from a measured pin."""
    measured = measured_pins() if measured is None else measured
    cert = read_broker_cert(broker_cert_file) if broker_cert_file else None
    owner = read_owner_key(owner_key_file) if owner_key_file else None
    if measured.measured:
        if cert is not None and cert != measured.broker_cert:
            raise TrustError(
                f"--broker-cert {broker_cert_file} differs from the broker certificate pinned in "
                "the measured boot: the host cannot choose the broker",
                hint="drop --broker-cert: the master trusts only the measured pin",
            )
        if owner is not None and owner != measured.owner_key:
            raise TrustError(
                f"--owner-key {owner_key_file} differs from the owner key pinned in the measured "
                "boot: the host cannot choose whose packages run",
                hint="drop --owner-key: the master trusts only the measured pin",
            )
        return measured
    if cert is None and owner is None:
        return Pins()
    return Pins(cert, owner, GIVEN)


def read_broker_cert(path: Path) -> bytes:
    """A certificate file, PEM or DER, as DER."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise TrustError(f"cannot read the broker certificate {path}: "
                         f"{exc.strerror or exc}") from None  # fmt: skip
    try:
        cert = (x509.load_pem_x509_certificate(data) if b"-----BEGIN" in data
                else x509.load_der_x509_certificate(data))  # fmt: skip
    except ValueError:
        raise TrustError(f"{path} is not an X.509 certificate (PEM or DER)") from None
    return _check_cert(cert.public_bytes(Encoding.DER), str(path))


def read_owner_key(path: Path) -> bytes:
    """An owner's public key file (PEM SubjectPublicKeyInfo, Ed25519) as its raw 32 bytes."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.serialization import (
        Encoding,
        PublicFormat,
        load_pem_public_key,
    )

    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise TrustError(f"cannot read the owner key {path}: {exc.strerror or exc}") from None
    try:
        key = load_pem_public_key(data)
    except (ValueError, TypeError):
        raise TrustError(
            f"{path} is not a PEM public key",
            hint="give the owner's public key (PEM), not its private key",
        ) from None
    if not isinstance(key, Ed25519PublicKey):
        raise TrustError(f"{path} is not an Ed25519 public key")
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def _check_cert(der: bytes, what: str) -> bytes:
    from cryptography import x509

    if not 0 < len(der) <= MAX_CERT_BYTES:
        raise TrustError(f"{what}: a certificate of {len(der)} bytes")
    try:
        x509.load_der_x509_certificate(der)
    except ValueError:
        raise TrustError(f"{what} is not a DER X.509 certificate") from None
    return der


def _check_owner(raw: bytes, what: str) -> bytes:
    if len(raw) != OWNER_KEY_BYTES:
        raise TrustError(f"{what} is {len(raw)} bytes, not a {OWNER_KEY_BYTES}-byte Ed25519 key")
    return raw
