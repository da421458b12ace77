"""The key broker's identity: an EC P-256 key and a self-signed X.509 certificate for it, in a
folder (`broker.key`, mode 0600; `broker.pem`).

The certificate is what the owner pins in the master's measured boot (the kernel command line's
`gcvm.broker_cert=<base64url DER>`), so one key does two jobs: it is the TLS server key (a
master trusts exactly that certificate: the host, which owns the network path, cannot answer in
the broker's place) and the key that signs the broker's attestation tokens (ES256, `kid` = the
certificate's SHA-256), which the master verifies before it believes a token's claims. The name in
the certificate is only a label: the pin is the certificate itself, and the identity is its key.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from orchestrator.errors import UsageError

KEY_FILE = "broker.key"
CERT_FILE = "broker.pem"
COMMON_NAME = "gcvm key broker"
VALID_DAYS = 3650
BROKER_CERT_PARAM = "gcvm.broker_cert"  # the master's pin (groupcover.trust reads it)


@dataclass(frozen=True)
class Identity:
    folder: Path
    key_pem: bytes  # PKCS#8, unencrypted (the file is 0600)
    cert_der: bytes

    @property
    def key_file(self) -> Path:
        return self.folder / KEY_FILE

    @property
    def cert_file(self) -> Path:
        return self.folder / CERT_FILE

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the certificate (DER), hex: the token's `kid`, what a result names."""
        return hashlib.sha256(self.cert_der).hexdigest()

    @property
    def cmdline_param(self) -> str:
        """The kernel command line parameter that pins this broker in a master's boot."""
        return cmdline_param(self.cert_der)

    def ssl_context(self):  # -> ssl.SSLContext
        import ssl

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(str(self.cert_file), str(self.key_file))
        return context


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def cmdline_param(cert_der: bytes) -> str:
    # the same encoding as groupcover.trust.cmdline_params (the orchestrator does not import it)
    return f"{BROKER_CERT_PARAM}={b64url(cert_der)}"


def load_or_create(folder: Path) -> Identity:
    """The identity in `folder`, made there first if it has none (the folder 0700, the key
    0600 from its creation on)."""
    folder = Path(folder)
    if not (folder / KEY_FILE).exists():
        if (folder / CERT_FILE).exists():
            raise UsageError(f"{folder / CERT_FILE} is there without its key {KEY_FILE}",
                             hint="restore the key, or remove the certificate to make a new "
                             "identity (and pin the new one)")  # fmt: skip
        _create(folder)
    return load(folder)


def load(folder: Path) -> Identity:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import (
        Encoding,
        PublicFormat,
        load_pem_private_key,
    )

    folder = Path(folder)
    key_path, cert_path = folder / KEY_FILE, folder / CERT_FILE
    try:
        mode = key_path.stat().st_mode
        key_pem = key_path.read_bytes()
        cert_pem = cert_path.read_bytes()
    except OSError as exc:
        raise UsageError(f"broker identity {folder}: {exc.strerror or exc} "
                         f"({exc.filename})") from None  # fmt: skip
    if stat.S_IMODE(mode) & 0o077:
        raise UsageError(
            f"{key_path} is readable by others (mode {stat.S_IMODE(mode):o})",
            hint=f"chmod 600 {key_path}; if others may have read it, make a new identity",
        )
    try:
        key = load_pem_private_key(key_pem, password=None)
        cert = x509.load_pem_x509_certificate(cert_pem)
    except (ValueError, TypeError):
        raise UsageError(f"broker identity {folder}: {KEY_FILE} or {CERT_FILE} does not "
                         "parse") from None  # fmt: skip
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise UsageError(f"{key_path} is not an EC P-256 key")
    spki = (Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    if cert.public_key().public_bytes(*spki) != key.public_key().public_bytes(*spki):
        raise UsageError(f"{cert_path} is not the certificate of {key_path}")
    return Identity(folder, key_pem, cert.public_bytes(Encoding.DER))


def _create(folder: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import (
        Encoding,
        NoEncryption,
        PrivateFormat,
    )
    from cryptography.x509.oid import NameOID

    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, COMMON_NAME)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    # O_EXCL: never over an existing key; 0600 from the first byte on (umask only narrows it)
    fd = os.open(folder / KEY_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    fd = os.open(folder / CERT_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(cert.public_bytes(Encoding.PEM))
