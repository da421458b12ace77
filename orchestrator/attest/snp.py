"""AMD SEV-SNP attestation reports: parse the 1184-byte report and verify it offline.

Checks, in order: the layout (size, version, signature algorithm); the ECDSA P-384 signature over
bytes 0x000..0x29F with the VCEK or VLEK that the report's flags name; that key's chain to a
trusted ARK (ARK self-signed -> ASK or ASVK -> VCEK/VLEK, RSA-PSS SHA-384, salt 48) with every
certificate valid at `now`; the reported TCB and chip id against the VCEK's extensions (a VLEK has
no hardware id); and the guest policy (debug forbidden). Reference values (measurement, minimum
TCB, VMPL, report data) are the caller's: see `check_policy`.
"""

from __future__ import annotations

import datetime as dt
import functools
import struct
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.x509.oid import NameOID, SignatureAlgorithmOID

from orchestrator.attest.common import BadEvidence, Verdict

REPORT_SIZE = 1184
SIGNED_END = 0x2A0
POLICY_SMT = 1 << 16
POLICY_MIGRATE_MA = 1 << 18
POLICY_DEBUG = 1 << 19
POLICY_SINGLE_SOCKET = 1 << 20
PRODUCTS = ("Milan", "Genoa", "Turin")

# VCEK/VLEK X.509 extensions (AMD's "Versioned Chip Endorsement Key" specification)
OID_PRODUCT_NAME = "1.3.6.1.4.1.3704.1.2"
OID_BL_SPL = "1.3.6.1.4.1.3704.1.3.1"
OID_TEE_SPL = "1.3.6.1.4.1.3704.1.3.2"
OID_SNP_SPL = "1.3.6.1.4.1.3704.1.3.3"
OID_UCODE_SPL = "1.3.6.1.4.1.3704.1.3.8"
OID_FMC_SPL = "1.3.6.1.4.1.3704.1.3.9"
OID_HW_ID = "1.3.6.1.4.1.3704.1.4"
TCB_OIDS = {
    "bootloader": OID_BL_SPL,
    "tee": OID_TEE_SPL,
    "snp": OID_SNP_SPL,
    "microcode": OID_UCODE_SPL,
    "fmc": OID_FMC_SPL,
}


@dataclass(frozen=True)
class Tcb:
    bootloader: int
    tee: int
    snp: int
    microcode: int
    fmc: int | None = None  # Turin only

    @classmethod
    def decode(cls, raw: bytes, product: str | None) -> Tcb:
        if product == "Turin":
            return cls(bootloader=raw[1], tee=raw[2], snp=raw[3], microcode=raw[7], fmc=raw[0])
        return cls(bootloader=raw[0], tee=raw[1], snp=raw[6], microcode=raw[7])

    def as_dict(self) -> dict[str, int]:
        d = {"bootloader": self.bootloader, "tee": self.tee, "snp": self.snp}
        d["microcode"] = self.microcode
        if self.fmc is not None:
            d["fmc"] = self.fmc
        return d


@dataclass(frozen=True)
class SnpReport:
    raw: bytes
    version: int
    guest_svn: int
    policy: int
    vmpl: int
    signature_algo: int
    platform_info: int
    flags: int
    report_data: bytes
    measurement: bytes
    host_data: bytes
    id_key_digest: bytes
    author_key_digest: bytes
    report_id: bytes
    reported_tcb_raw: bytes
    chip_id: bytes
    signature_r: int
    signature_s: int

    @property
    def signing_key(self) -> str:
        """VCEK (0), VLEK (1) or none (7), from flags bits 2..4."""
        return {0: "VCEK", 1: "VLEK", 7: "none"}.get((self.flags >> 2) & 7, "reserved")

    @property
    def debug_allowed(self) -> bool:
        return bool(self.policy & POLICY_DEBUG)

    @property
    def signed_bytes(self) -> bytes:
        return self.raw[:SIGNED_END]


def parse_report(raw: bytes) -> SnpReport:
    if len(raw) != REPORT_SIZE:
        raise BadEvidence(
            f"an SEV-SNP report has {REPORT_SIZE} bytes, this one {len(raw)} "
            "(truncated or not a report)"
        )
    u32 = lambda off: struct.unpack_from("<I", raw, off)[0]  # noqa: E731
    u64 = lambda off: struct.unpack_from("<Q", raw, off)[0]  # noqa: E731
    return SnpReport(
        raw=raw,
        version=u32(0x00),
        guest_svn=u32(0x04),
        policy=u64(0x08),
        vmpl=u32(0x30),
        signature_algo=u32(0x34),
        platform_info=u64(0x40),
        flags=u32(0x48),
        report_data=raw[0x50:0x90],
        measurement=raw[0x90:0xC0],
        host_data=raw[0xC0:0xE0],
        id_key_digest=raw[0xE0:0x110],
        author_key_digest=raw[0x110:0x140],
        report_id=raw[0x140:0x160],
        reported_tcb_raw=raw[0x180:0x188],
        chip_id=raw[0x1A0:0x1E0],
        signature_r=int.from_bytes(raw[0x2A0:0x2E8], "little"),
        signature_s=int.from_bytes(raw[0x2E8:0x330], "little"),
    )


def read_report_file(path: Path) -> bytes:
    """A report as raw bytes, or as hex text (virtee's test files)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BadEvidence(f"cannot read {path}: {exc.strerror}") from None
    if len(data) != REPORT_SIZE:
        text = data.strip()
        try:
            decoded = bytes.fromhex(text.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            decoded = b""
        if decoded:
            return decoded
    return data


# --- certificates ------------------------------------------------------------------------------


@dataclass
class SnpCerts:
    """The certificates at hand: endorsement keys (VCEK/VLEK) and AMD's chains, by role."""

    vcek: list[x509.Certificate] = field(default_factory=list)
    vlek: list[x509.Certificate] = field(default_factory=list)
    ask: list[x509.Certificate] = field(default_factory=list)
    asvk: list[x509.Certificate] = field(default_factory=list)
    ark: list[x509.Certificate] = field(default_factory=list)

    def add(self, cert: x509.Certificate, hint: str | None = None) -> None:
        role = hint or _role(cert)
        getattr(self, role.lower(), self.ask).append(cert)

    def extend(self, other: SnpCerts) -> None:
        for role in ("vcek", "vlek", "ask", "asvk", "ark"):
            getattr(self, role).extend(getattr(other, role))

    @classmethod
    def load_dir(cls, folder: Path) -> SnpCerts:
        if not folder.is_dir():
            raise BadEvidence(f"--certs {folder} is not a folder")
        certs = cls()
        for path in sorted(folder.iterdir()):
            if path.suffix.lower() in (".der", ".pem", ".crt", ".cer") or path.suffix == "":
                for cert in load_certificates(path.read_bytes(), str(path)):
                    certs.add(cert)
        return certs

    @classmethod
    def from_table(cls, entries: Iterable[tuple[str, bytes]]) -> SnpCerts:
        """From a certificate table (configfs-tsm auxblob / SNP_GET_EXT_REPORT): (kind, DER)."""
        certs = cls()
        for kind, der in entries:
            for cert in load_certificates(der, f"{kind} in the certificate table"):
                certs.add(cert, kind if kind.upper() in ("VCEK", "VLEK", "ASK", "ARK") else None)
        return certs


def load_certificates(data: bytes, what: str) -> list[x509.Certificate]:
    try:
        with warnings.catch_warnings():
            # AMD's VCEKs carry serial number 0, which cryptography warns about
            warnings.simplefilter("ignore", CryptographyDeprecationWarning)
            if b"-----BEGIN CERTIFICATE-----" in data:
                return x509.load_pem_x509_certificates(data)
            return [x509.load_der_x509_certificate(data)]
    except ValueError as exc:
        raise BadEvidence(f"{what} is not an X.509 certificate ({exc})") from None


def _cn(name: x509.Name) -> str:
    attrs = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attrs[0].value) if attrs else ""


def _role(cert: x509.Certificate) -> str:
    cn = _cn(cert.subject)
    if cn == "SEV-VCEK":
        return "VCEK"
    if cn == "SEV-VLEK":
        return "VLEK"
    if cn.startswith("ARK-"):
        return "ARK"
    if cn.startswith("SEV-VLEK-"):
        return "ASVK"
    return "ASK"


def amd_chain(product: str) -> SnpCerts:
    """AMD's own ASK, ARK and ASVK for a product line (package data, AMD's public certificates)."""
    if product not in PRODUCTS:
        raise BadEvidence(
            f"unknown SEV-SNP product line {product!r} (known: {', '.join(PRODUCTS)})"
        )
    certs = SnpCerts()
    for cert in _amd_pem(product):
        certs.add(cert)
    return certs


@functools.cache
def _amd_pem(product: str) -> tuple[x509.Certificate, ...]:
    data = resources.files("orchestrator.attest") / "amd" / f"{product.lower()}-ask-ark-asvk.pem"
    return tuple(x509.load_pem_x509_certificates(data.read_bytes()))


def amd_roots() -> list[x509.Certificate]:
    return [cert for product in PRODUCTS for cert in amd_chain(product).ark]


def _ext(cert: x509.Certificate, oid: str) -> bytes | None:
    try:
        ext = cert.extensions.get_extension_for_oid(x509.ObjectIdentifier(oid))
    except x509.ExtensionNotFound:
        return None
    value = ext.value
    return value.value if isinstance(value, x509.UnrecognizedExtension) else None


def _der_int(raw: bytes) -> int | None:
    if len(raw) >= 3 and raw[0] == 0x02 and raw[1] == len(raw) - 2:
        return int.from_bytes(raw[2:], "big")
    return None


def _der_string(raw: bytes) -> bytes:
    """The contents of a short DER OCTET/IA5 STRING, or the bytes as they are."""
    if len(raw) >= 2 and raw[0] in (0x04, 0x16) and raw[1] == len(raw) - 2:
        return raw[2:]
    return raw


def cert_product(cert: x509.Certificate) -> str | None:
    raw = _ext(cert, OID_PRODUCT_NAME)
    if raw is None:
        return None
    name = _der_string(raw).decode("ascii", "replace")
    return name.split("-")[0]


def cert_tcb(cert: x509.Certificate) -> dict[str, int]:
    found = {}
    for name, oid in TCB_OIDS.items():
        raw = _ext(cert, oid)
        if raw is not None and (value := _der_int(raw)) is not None:
            found[name] = value
    return found


def cert_hwid(cert: x509.Certificate) -> bytes | None:
    raw = _ext(cert, OID_HW_ID)
    return None if raw is None else _der_string(raw)


def _signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> str | None:
    """None when `issuer` signed `cert` with RSA-PSS SHA-384 (salt 48), else why not."""
    if cert.issuer != issuer.subject:
        return f"issued by {_cn(cert.issuer)!r}, not by {_cn(issuer.subject)!r}"
    if cert.signature_algorithm_oid != SignatureAlgorithmOID.RSASSA_PSS:
        return f"signed with {cert.signature_algorithm_oid.dotted_string}, not RSA-PSS"
    key = issuer.public_key()
    if not isinstance(key, rsa.RSAPublicKey):
        return f"{_cn(issuer.subject)} has no RSA key"
    try:
        key.verify(
            cert.signature,
            cert.tbs_certificate_bytes,
            padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48),
            hashes.SHA384(),
        )
    except InvalidSignature:
        return f"signature by {_cn(issuer.subject)} does not verify"
    return None


def _spki(cert: x509.Certificate) -> bytes:
    return cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _valid_at(cert: x509.Certificate, now: dt.datetime) -> str | None:
    if now < cert.not_valid_before_utc:
        return f"{_cn(cert.subject)} not valid before {cert.not_valid_before_utc:%Y-%m-%d}"
    if now > cert.not_valid_after_utc:
        return f"{_cn(cert.subject)} expired on {cert.not_valid_after_utc:%Y-%m-%d}"
    return None


def _chain(
    key_cert: x509.Certificate,
    certs: SnpCerts,
    vlek: bool,
    roots: Sequence[x509.Certificate],
    now: dt.datetime,
) -> tuple[list[str], list[str]]:
    """(failures, proved) for key -> ASK/ASVK -> ARK -> trusted root."""
    intermediates = certs.asvk if vlek else certs.ask
    label = "ASVK" if vlek else "ASK"
    key_name = "VLEK" if vlek else "VCEK"
    reasons = []
    for inter in intermediates:
        why = _signed_by(key_cert, inter)
        if why is not None:
            reasons.append(why)
            continue
        for ark in certs.ark:
            why_ark = _signed_by(inter, ark) or _signed_by(ark, ark)
            if why_ark is not None:
                reasons.append(f"{label}: {why_ark}")
                continue
            if not any(_spki(ark) == _spki(root) for root in roots):
                reasons.append(f"ARK {_cn(ark.subject)!r} is not a trusted root (not AMD's)")
                continue
            failures = [w for c in (key_cert, inter, ark) if (w := _valid_at(c, now))]
            return failures, [f"chain {key_name} -> {_cn(inter.subject)} -> {_cn(ark.subject)}"]
    if not intermediates:
        reasons.append(f"no {label} certificate")
    return [f"{key_name} chain: " + "; ".join(dict.fromkeys(reasons))], []


def verify_key_chain(
    key_cert: x509.Certificate,
    certs: SnpCerts | None = None,
    *,
    now: dt.datetime | None = None,
    roots: Sequence[x509.Certificate] | None = None,
) -> list[str]:
    """Why a VCEK or VLEK alone does not chain to a trusted ARK (empty: it does)."""
    vlek = _role(key_cert) == "VLEK"
    pool = SnpCerts()
    if certs is not None:
        pool.extend(certs)
    product = cert_product(key_cert)
    if product in PRODUCTS:
        pool.extend(amd_chain(product))
    failures, _ = _chain(key_cert, pool, vlek, roots or amd_roots(), now or dt.datetime.now(dt.UTC))
    return failures


def verify_report(
    raw: bytes,
    certs: SnpCerts | None = None,
    *,
    now: dt.datetime | None = None,
    roots: Sequence[x509.Certificate] | None = None,
) -> Verdict:
    """Verify one report offline. `certs` must hold its VCEK or VLEK; AMD's chain for the key's
    product line is added from the package. `roots` (default: AMD's ARKs) are the trust anchors."""
    report = parse_report(raw)
    now = now or dt.datetime.now(dt.UTC)
    certs = certs or SnpCerts()
    verdict = Verdict("snp", {})
    vlek = report.signing_key == "VLEK"
    keys = certs.vlek if vlek else certs.vcek
    product = next((p for k in keys if (p := cert_product(k))), None)
    tcb = Tcb.decode(report.reported_tcb_raw, product)
    verdict.claims.update(
        {
            "version": report.version,
            "product": product or "unknown",
            "signing_key": report.signing_key,
            "vmpl": report.vmpl,
            "policy": f"0x{report.policy:x}",
            "policy_debug_allowed": report.debug_allowed,
            "policy_smt_allowed": bool(report.policy & POLICY_SMT),
            "guest_svn": report.guest_svn,
            "measurement": report.measurement.hex(),
            "report_data": report.report_data.hex(),
            "host_data": report.host_data.hex(),
            "chip_id": report.chip_id.hex(),
            "reported_tcb": tcb.as_dict(),
            "platform_info": f"0x{report.platform_info:x}",
        }
    )
    if report.version < 2:
        verdict.fail(f"report version {report.version} is not supported (need >= 2)")
    if report.signature_algo != 1:
        verdict.fail(f"signature algorithm {report.signature_algo} is not ECDSA P-384 (1)")
    if report.signing_key not in ("VCEK", "VLEK"):
        verdict.fail(f"report is signed by no endorsement key ({report.signing_key})")
        return verdict
    if not keys:
        verdict.fail(
            f"no {report.signing_key} certificate for this report "
            "(none in the certificate table, --certs or the policy's snp.certs)"
        )
        return verdict
    key_cert = _signer(report, keys)
    if key_cert is None:
        verdict.fail(f"report signature does not verify with the {report.signing_key}")
        return verdict
    verdict.verified.append(f"report signature (ECDSA P-384) by the {report.signing_key}")
    pool = SnpCerts()
    pool.extend(certs)
    if product in PRODUCTS:
        pool.extend(amd_chain(product))
    failures, proved = _chain(key_cert, pool, vlek, roots or amd_roots(), now)
    verdict.failures += failures
    verdict.verified += proved
    expected = cert_tcb(key_cert)
    got = tcb.as_dict()
    mismatched = [f"{k} {got.get(k)} != {v}" for k, v in expected.items() if got.get(k) != v]
    if mismatched:
        verdict.fail(
            f"reported TCB does not match the {report.signing_key}: " + ", ".join(mismatched)
        )
    hwid = cert_hwid(key_cert)
    if hwid is not None and hwid != report.chip_id:
        if report.chip_id == bytes(64):
            verdict.fail("chip id is masked (all zero): the report cannot be tied to the VCEK")
        else:
            verdict.fail("chip id does not match the VCEK's hardware id")
    if not vlek and hwid is None:
        verdict.fail("VCEK has no hardware id extension")
    if report.debug_allowed:
        verdict.fail("guest policy allows debugging (policy bit 19): its memory is not private")
    return verdict


def _signer(report: SnpReport, keys: Sequence[x509.Certificate]) -> x509.Certificate | None:
    signature = encode_dss_signature(report.signature_r, report.signature_s)
    for cert in keys:
        key = cert.public_key()
        if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp384r1":
            continue
        try:
            key.verify(signature, report.signed_bytes, ec.ECDSA(hashes.SHA384()))
        except InvalidSignature:
            continue
        return cert
    return None


def check_policy(verdict: Verdict, policy: Any) -> None:
    """Reference values: accepted measurements, minimum TCB, accepted VMPLs, guest policy bits
    (SnpPolicy)."""
    claims = verdict.claims
    if policy.measurements and claims["measurement"] not in policy.measurements:
        verdict.fail(f"unknown measurement {claims['measurement'][:16]}... (not in the policy)")
    if policy.vmpl is not None and claims["vmpl"] not in policy.vmpl:
        verdict.fail(f"VMPL {claims['vmpl']} is not accepted (policy: {policy.vmpl})")
    tcb = claims["reported_tcb"]
    low = [
        f"{k} {tcb.get(k)} < {v}" for k, v in (policy.min_tcb or {}).items() if tcb.get(k, -1) < v
    ]
    if low:
        verdict.fail("TCB below the policy's minimum: " + ", ".join(low))
    host_data = getattr(policy, "host_data", None)
    if host_data and claims["host_data"] not in host_data:
        verdict.fail(f"HOST_DATA {claims['host_data'][:16]}... is not the policy's (a pod's: "
                     "the first 32 bytes of its initdata digest)")  # fmt: skip
    pins = getattr(policy, "guest_policy", None)
    if pins is None:
        return
    bits = int(claims["policy"], 16)
    for name, bit, pin in (("SMT", POLICY_SMT, pins.smt), ("migration agent", POLICY_MIGRATE_MA,
                           pins.migrate_ma), ("single socket", POLICY_SINGLE_SOCKET,
                           pins.single_socket)):  # fmt: skip
        if pin is not None and bool(bits & bit) != pin:
            verdict.fail(f"guest policy {claims['policy']}: {name} is "
                         f"{'allowed' if bits & bit else 'not allowed'}, the policy pins "
                         f"{'allowed' if pin else 'not allowed'}")  # fmt: skip
    abi = ((bits >> 8) & 0xFF, bits & 0xFF)
    if pins.abi_min is not None and abi < pins.abi_min:
        verdict.fail(f"guest policy ABI minimum {abi[0]}.{abi[1]} is below the policy's "
                     f"{pins.abi_min[0]}.{pins.abi_min[1]}")  # fmt: skip
