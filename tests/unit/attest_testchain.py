"""A synthetic SEV-SNP world for the tests: a fake ARK -> ASK -> VCEK chain made with
`cryptography` (same algorithms as AMD's: RSA-PSS SHA-384 salt 48, a P-384 VCEK with AMD's
extensions), reports signed by that VCEK, a configfs-tsm fake that produces them, and synthetic TDX
quotes for a labelled fake quote verifier. Nothing here is trusted outside the tests: the broker
accepts this ARK only because a test's policy names it as a root."""

from __future__ import annotations

import datetime as dt
import errno
import hashlib
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from groupcover.keyrelease.evidence import OsFs, build_cert_table

PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)
TCB = {"bootloader": 3, "tee": 0, "snp": 8, "microcode": 115}
GOOD_MEASUREMENT = bytes(range(48))
NOT_BEFORE = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
NOT_AFTER = dt.datetime(2040, 1, 1, tzinfo=dt.UTC)


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "gcvm test chain (not AMD)"),
        ]
    )


def _der_int(value: int) -> bytes:
    body = value.to_bytes(max(1, (value.bit_length() + 8) // 8), "big")
    return bytes([0x02, len(body)]) + body


def _cert(subject: str, issuer: str, public_key, signing_key, extensions=()) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOT_BEFORE)
        .not_valid_after(NOT_AFTER)
    )
    for oid, value in extensions:
        builder = builder.add_extension(
            x509.UnrecognizedExtension(x509.ObjectIdentifier(oid), value), critical=False
        )
    return builder.sign(signing_key, hashes.SHA384(), rsa_padding=PSS)


@dataclass
class SnpTestChain:
    ark_key: rsa.RSAPrivateKey
    ask_key: rsa.RSAPrivateKey
    vcek_key: ec.EllipticCurvePrivateKey
    ark: x509.Certificate
    ask: x509.Certificate
    vcek: x509.Certificate
    chip_id: bytes = field(default=bytes(range(64)))

    @classmethod
    def make(
        cls, chip_id: bytes = bytes(range(64)), tcb: dict[str, int] | None = None
    ) -> SnpTestChain:
        tcb = tcb or TCB
        ark_key = rsa.generate_private_key(65537, 2048)
        ask_key = rsa.generate_private_key(65537, 2048)
        vcek_key = ec.generate_private_key(ec.SECP384R1())
        ark = _cert("ARK-Milan", "ARK-Milan", ark_key.public_key(), ark_key)
        ask = _cert("SEV-Milan", "ARK-Milan", ask_key.public_key(), ark_key)
        ext = [
            ("1.3.6.1.4.1.3704.1.2", b"\x16\x08Milan-B0"),
            ("1.3.6.1.4.1.3704.1.3.1", _der_int(tcb["bootloader"])),
            ("1.3.6.1.4.1.3704.1.3.2", _der_int(tcb["tee"])),
            ("1.3.6.1.4.1.3704.1.3.3", _der_int(tcb["snp"])),
            ("1.3.6.1.4.1.3704.1.3.8", _der_int(tcb["microcode"])),
            ("1.3.6.1.4.1.3704.1.4", chip_id),
        ]
        vcek = _cert("SEV-VCEK", "SEV-Milan", vcek_key.public_key(), ask_key, ext)
        return cls(ark_key, ask_key, vcek_key, ark, ask, vcek, chip_id)

    def der(self, cert: x509.Certificate) -> bytes:
        return cert.public_bytes(serialization.Encoding.DER)

    def write(self, folder: Path) -> tuple[Path, Path]:
        """certs/ (VCEK, ASK, ARK) and roots.pem (the ARK) for a policy file."""
        certs = folder / "certs"
        certs.mkdir(parents=True, exist_ok=True)
        (certs / "vcek.der").write_bytes(self.der(self.vcek))
        (certs / "ask.der").write_bytes(self.der(self.ask))
        (certs / "ark.der").write_bytes(self.der(self.ark))
        roots = folder / "roots.pem"
        roots.write_bytes(self.ark.public_bytes(serialization.Encoding.PEM))
        return certs, roots

    def cert_table(self) -> bytes:
        return build_cert_table(
            [
                ("vcek", self.der(self.vcek)),
                ("ask", self.der(self.ask)),
                ("ark", self.der(self.ark)),
            ]
        )

    def report(
        self,
        report_data: bytes = bytes(64),
        *,
        measurement: bytes = GOOD_MEASUREMENT,
        policy: int = 0x30000,
        vmpl: int = 0,
        tcb: dict[str, int] | None = None,
        version: int = 2,
        flags: int = 0,
        chip_id: bytes | None = None,
    ) -> bytes:
        tcb = tcb or TCB
        raw = bytearray(1184)
        struct.pack_into("<II", raw, 0, version, 0)
        struct.pack_into("<Q", raw, 0x08, policy)
        struct.pack_into("<II", raw, 0x30, vmpl, 1)
        struct.pack_into("<I", raw, 0x48, flags)
        raw[0x50:0x90] = report_data.ljust(64, b"\0")
        raw[0x90:0xC0] = measurement
        tcb_raw = bytes([tcb["bootloader"], tcb["tee"], 0, 0, 0, 0, tcb["snp"], tcb["microcode"]])
        raw[0x38:0x40] = tcb_raw  # current TCB
        raw[0x180:0x188] = tcb_raw  # reported TCB
        raw[0x1A0:0x1E0] = chip_id if chip_id is not None else self.chip_id
        return self.sign(bytes(raw))

    def sign(self, raw: bytes) -> bytes:
        der = self.vcek_key.sign(raw[:0x2A0], ec.ECDSA(hashes.SHA384()))
        r, s = decode_dss_signature(der)
        out = bytearray(raw)
        out[0x2A0:0x330] = bytes(0x90)
        out[0x2A0:0x2E8] = r.to_bytes(72, "little")
        out[0x2E8:0x330] = s.to_bytes(72, "little")
        return bytes(out)


class FakeTsm(OsFs):
    """configfs-tsm laid out in a real folder as Documentation/ABI/testing/configfs-tsm-report
    documents it: `mkdir` of an entry makes `provider`, `generation` (0), `inblob`, `outblob`
    (and for sev_guest `auxblob`, `privlevel`, `privlevel_floor`); every write bumps
    `generation`; reading `outblob` makes the report from `inblob` with `make(inblob)`; an inblob
    over 64 bytes is refused with EINVAL as the kernel does. The code under test uses OsFs's
    real file operations on it; only what the kernel does on its own is simulated."""

    def __init__(self, root: Path, provider: str, make, auxblob: bytes = b"", floor: int = 0):
        self.root = root
        self.provider = provider
        self.make = make
        self.auxblob = auxblob
        self.floor = floor
        self.removed: list[Path] = []
        root.mkdir(parents=True, exist_ok=True)

    @property
    def entries(self) -> list[Path]:
        return sorted(p for p in self.root.iterdir() if p.is_dir())

    def mkdir(self, path: Path) -> None:
        super().mkdir(path)
        (path / "provider").write_text(self.provider + "\n")
        (path / "generation").write_text("0\n")
        (path / "inblob").write_bytes(b"")
        (path / "outblob").write_bytes(b"")
        if self.provider == "sev_guest":
            (path / "auxblob").write_bytes(b"")
            (path / "privlevel").write_bytes(b"")
            (path / "privlevel_floor").write_text(f"{self.floor}\n")

    def rmdir(self, path: Path) -> None:
        for child in path.iterdir():
            child.unlink()  # configfs drops the attributes with the entry
        super().rmdir(path)
        self.removed.append(path)

    def write(self, path: Path, data: bytes) -> None:
        if path.name == "inblob" and len(data) > 64:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        if path.name == "privlevel" and not self.floor <= int(data) <= 3:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        super().write(path, data)
        generation = path.parent / "generation"
        generation.write_text(f"{int(generation.read_text()) + 1}\n")

    def read(self, path: Path) -> bytes:
        if path.name == "outblob":
            path.write_bytes(self.make((path.parent / "inblob").read_bytes()))
        elif path.name == "auxblob":
            path.write_bytes(self.auxblob)
        return super().read(path)


# --- synthetic TDX quotes, for a fake quote verifier (labelled as such in the tests) -------


def tdx_quote(
    report_data: bytes = bytes(64),
    *,
    mrtd: bytes = bytes([7]) * 48,
    rtmrs: tuple[bytes, ...] = (bytes(48),) * 4,
    td_attributes: int = 0x10000000,
) -> bytes:
    header = struct.pack("<HHI", 4, 2, 0x81) + bytes(40)
    body = bytearray(584)
    struct.pack_into("<Q", body, 120, td_attributes)
    body[136:184] = mrtd
    for i, rtmr in enumerate(rtmrs):
        body[328 + 48 * i : 376 + 48 * i] = rtmr
    body[520:584] = report_data.ljust(64, b"\0")
    signed = header + bytes(body)
    tag = hashlib.sha256(b"fake-qe" + signed).digest()
    return signed + struct.pack("<I", len(tag)) + tag


def fake_quote_verifier(quote: bytes, collateral: str, now: int) -> tuple[str, list[str]]:
    """NOT dcap-qvl: accepts the quotes `tdx_quote` made (a SHA-256 tag stands in for the QE's
    ECDSA signature), so the broker's TDX policy path can be tested with chosen values."""
    signed, tag = quote[:632], quote[636:]
    if hashlib.sha256(b"fake-qe" + signed).digest() != tag:
        raise ValueError("Verification failed: fake QE signature is invalid")
    return "UpToDate", []
