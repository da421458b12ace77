"""Hardware evidence inside the guest, behind one narrow interface.

`EvidenceSource.collect(report_data) -> (tee, tee-evidence JSON)` with 64 bytes of report data.
Real sources: configfs-tsm (`/sys/kernel/config/tsm/report`, Linux >= 6.7: TDX quotes and SNP
reports with the host's certificate table in `auxblob`), then `/dev/sev-guest` (SNP_GET_REPORT)
as the fallback for older SNP guest kernels. `NoEvidence` is the `--tee none` case (the broker
must run with --insecure-no-attestation). The filesystem and the ioctl are injectable, so the
tests drive the real code against fakes. Nothing here verifies anything: the broker does.
"""

from __future__ import annotations

import base64
import contextlib
import os
import secrets
import struct
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from groupcover.errors import GroupCoverError

TSM_ROOT = Path("/sys/kernel/config/tsm/report")
SEV_GUEST = Path("/dev/sev-guest")
SNP_REPORT_SIZE = 1184

# GUIDs of the SEV-SNP certificate table (GHCB spec, "SNP Extended Guest Request")
CERT_TABLE_GUIDS = {
    uuid.UUID("63da758d-e664-4564-adc5-f4b93be8accd"): "vcek",
    uuid.UUID("a8074bc2-a25a-483e-aae6-39c045a0b8a1"): "vlek",
    uuid.UUID("4ab7b379-bbac-4fe4-a02f-05aef327c782"): "ask",
    uuid.UUID("c0b406a4-a803-4952-9743-3fb6014cd0ae"): "ark",
}


class EvidenceError(GroupCoverError):
    """The guest could not produce evidence (no TEE device, a kernel or host refusal)."""


class EvidenceSource(Protocol):
    tee: str  # the KBS protocol's name: "snp", "tdx" or "sample"

    def collect(self, report_data: bytes) -> dict[str, Any]: ...


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def parse_cert_table(blob: bytes) -> list[dict[str, str]]:
    """The SNP certificate table (GUID, offset, length entries, zero-terminated) as Trustee's
    `cert_chain`: [{"cert_type": "vcek", "data": base64 DER}, ...]."""
    entries = []
    pos = 0
    while pos + 24 <= len(blob):
        guid = uuid.UUID(bytes_le=blob[pos : pos + 16])
        offset, length = struct.unpack_from("<II", blob, pos + 16)
        pos += 24
        if guid.int == 0 and offset == 0 and length == 0:
            break
        if offset + length > len(blob):
            raise EvidenceError("the host's SNP certificate table is truncated")
        kind = CERT_TABLE_GUIDS.get(guid)
        if kind is not None:
            entries.append({"cert_type": kind, "data": _b64(blob[offset : offset + length])})
    return entries


def build_cert_table(certs: list[tuple[str, bytes]]) -> bytes:
    """The inverse of parse_cert_table (what a host hands the guest); used by fakes and tests."""
    by_kind = {v: k for k, v in CERT_TABLE_GUIDS.items()}
    header_size = 24 * (len(certs) + 1)
    header, body = b"", b""
    for kind, der in certs:
        header += by_kind[kind].bytes_le + struct.pack("<II", header_size + len(body), len(der))
        body += der
    return header + bytes(24) + body


# --- configfs-tsm ----------------------------------------------------------------------------


class TsmFs(Protocol):
    """The few filesystem operations configfs-tsm needs (a fake implements them in tests)."""

    def mkdir(self, path: Path) -> None: ...
    def rmdir(self, path: Path) -> None: ...
    def read(self, path: Path) -> bytes: ...
    def write(self, path: Path, data: bytes) -> None: ...
    def exists(self, path: Path) -> bool: ...


class OsFs:
    def mkdir(self, path: Path) -> None:
        os.mkdir(path)

    def rmdir(self, path: Path) -> None:
        os.rmdir(path)

    def read(self, path: Path) -> bytes:
        return path.read_bytes()

    def write(self, path: Path, data: bytes) -> None:
        with open(path, "wb", buffering=0) as f:
            f.write(data)

    def exists(self, path: Path) -> bool:
        return path.exists()


class ConfigfsTsm:
    """One report per fresh directory under configfs-tsm (so concurrent writers cannot mix)."""

    def __init__(self, root: Path = TSM_ROOT, fs: TsmFs | None = None, tee: str = "") -> None:
        self.root = root
        self.fs = fs or OsFs()
        self.tee = tee  # what the guest announces at auth; `collect` sets it from `provider`
        self.provider = ""

    def available(self) -> bool:
        return self.fs.exists(self.root)

    def collect(self, report_data: bytes) -> dict[str, Any]:
        if len(report_data) != 64:
            raise EvidenceError("report data must be 64 bytes")
        entry = self.root / f"gcvm-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            self.fs.mkdir(entry)
        except OSError as exc:
            raise EvidenceError(f"configfs-tsm: cannot create {entry}: {exc.strerror}") from None
        try:
            provider = self.fs.read(entry / "provider").decode().strip()
            generation = self.fs.read(entry / "generation").strip()
            self.fs.write(entry / "inblob", report_data)
            outblob = self.fs.read(entry / "outblob")
            aux = b""
            if self.fs.exists(entry / "auxblob"):
                with contextlib.suppress(OSError):
                    aux = self.fs.read(entry / "auxblob")
            if self.fs.read(entry / "generation").strip() != _next(generation):
                raise EvidenceError("configfs-tsm: another writer raced this report; try again")
        except OSError as exc:
            raise EvidenceError(f"configfs-tsm: {exc.strerror or exc}") from None
        finally:
            with contextlib.suppress(OSError):
                self.fs.rmdir(entry)
        self.provider = provider
        if provider.startswith("tdx"):
            self.tee = "tdx"
            return {"quote": _b64(outblob), "cc_eventlog": None}
        if provider.startswith("sev"):
            self.tee = "snp"
            if len(outblob) < SNP_REPORT_SIZE:
                raise EvidenceError(f"configfs-tsm: SNP report of {len(outblob)} bytes")
            evidence: dict[str, Any] = {"attestation_report": _b64(outblob[:SNP_REPORT_SIZE])}
            if aux:
                evidence["cert_chain"] = parse_cert_table(aux)
            return evidence
        raise EvidenceError(f"configfs-tsm provider {provider!r} is neither TDX nor SEV-SNP")


def _next(generation: bytes) -> bytes:
    try:
        return str(int(generation) + 1).encode()
    except ValueError:
        return b""


# --- /dev/sev-guest ------------------------------------------------------------------------

# _IOWR('S', 0x0, struct snp_guest_request_ioctl) with a 32-byte argument
SNP_GET_REPORT = (3 << 30) | (32 << 16) | (ord("S") << 8) | 0x0
Ioctl = Callable[[int, int, bytearray], Any]


class SevGuestDevice:
    """SNP_GET_REPORT on /dev/sev-guest: a report without the certificate table (the broker then
    takes the VCEK from its own --certs cache)."""

    tee = "snp"

    def __init__(
        self,
        path: Path = SEV_GUEST,
        ioctl: Ioctl | None = None,
        opener: Callable[[Path], int] | None = None,
        vmpl: int = 0,
    ) -> None:
        self.path = path
        self.vmpl = vmpl
        self._ioctl = ioctl
        self._open = opener or (lambda p: os.open(p, os.O_RDWR))

    def available(self) -> bool:
        return self.path.exists()

    def collect(self, report_data: bytes) -> dict[str, Any]:
        import ctypes
        import fcntl

        if len(report_data) != 64:
            raise EvidenceError("report data must be 64 bytes")
        request = ctypes.create_string_buffer(report_data + struct.pack("<I", self.vmpl), 96)
        response = ctypes.create_string_buffer(4000)
        arg = bytearray(
            struct.pack("<B7xQQQ", 1, ctypes.addressof(request), ctypes.addressof(response), 0)
        )
        try:
            fd = self._open(self.path)
        except OSError as exc:
            raise EvidenceError(f"cannot open {self.path}: {exc.strerror}") from None
        try:
            (self._ioctl or fcntl.ioctl)(fd, SNP_GET_REPORT, arg)
        except OSError as exc:
            fw_error, vmm_error = struct.unpack_from("<II", arg, 24)
            raise EvidenceError(
                f"SNP_GET_REPORT failed: {exc.strerror} (firmware 0x{fw_error:x}, "
                f"VMM 0x{vmm_error:x})"
            ) from None
        finally:
            os.close(fd)
        status, size = struct.unpack_from("<II", response.raw, 0)
        if status != 0 or size < SNP_REPORT_SIZE:
            raise EvidenceError(f"SNP_GET_REPORT: status 0x{status:x}, report size {size}")
        return {"attestation_report": _b64(response.raw[32 : 32 + SNP_REPORT_SIZE])}


class NoEvidence:
    """`--tee none`: no hardware evidence; only a broker started with --insecure-no-attestation
    releases a key to it (and says so)."""

    tee = "sample"

    def collect(self, report_data: bytes) -> dict[str, Any]:
        return {"svn": "0", "report_data": _b64(report_data)}


def detect(tee: str) -> EvidenceSource:
    """The evidence source for the guest's TEE: configfs-tsm first, /dev/sev-guest for SNP."""
    if tee == "none":
        return NoEvidence()
    tsm = ConfigfsTsm(TSM_ROOT, tee="tdx" if tee == "tdx" else "snp")
    if tsm.available():
        return tsm
    if tee in ("snp", "sev-snp") and SEV_GUEST.exists():
        return SevGuestDevice(SEV_GUEST)
    raise EvidenceError(
        f"no {tee} evidence in this guest: {TSM_ROOT} is absent (kernel < 6.7 or configfs not "
        f"mounted)" + (f" and {SEV_GUEST} is absent" if tee != "tdx" else ""),
        hint="TDX needs configfs-tsm; SEV-SNP works with either",
    )
