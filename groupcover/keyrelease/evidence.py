"""Hardware evidence inside the guest, behind one narrow interface.

`EvidenceSource.collect(report_data) -> (tee, tee-evidence JSON)` with 64 bytes of report data.
Real sources: configfs-tsm (`/sys/kernel/config/tsm/report`, Linux >= 6.7: TDX quotes and SNP
reports with the host's certificate table in `auxblob`), then `/dev/sev-guest` (SNP_GET_EXT_REPORT)
as the fallback for older SNP guest kernels. `NoEvidence` is the `--tee none` case (the broker
must run with --insecure-no-attestation). The filesystem and the ioctl are injectable, so the
tests drive the real code against fakes. Nothing here verifies anything: the broker does.
"""

from __future__ import annotations

import base64
import contextlib
import errno
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
# The kernel ABI (Documentation/ABI/testing/configfs-tsm-report, Linux >= 6.7): `mkdir` of an
# entry under the report folder (ENXIO when no TSM driver registered itself), `inblob` (WO, at
# most 64 bytes), `privlevel` (WO, SNP's VMPL, only where the provider has it, at least
# `privlevel_floor`), `outblob` (RO: reading it makes the report), `auxblob` (RO, SNP's
# certificate table, may be empty), `provider` (RO: "tdx_guest" or "sev_guest"), `generation`
# (RO: bumped by every write; the way to notice another writer), `rmdir` to drop the entry.

TSM_INBLOB_MAX = 64
TSM_TRIES = 3  # a report whose generation moved is made again, at most this often
PROVIDERS = {"tdx": "tdx_guest", "snp": "sev_guest"}  # the KBS tee name -> configfs provider


class NoEvidenceProvider(EvidenceError):
    """This guest has no TEE evidence provider at all (a plain VM, a kernel without the guest
    drivers): one line, `no TEE evidence provider (reason)`."""

    def __init__(self, reason: str, hint: str | None = None) -> None:
        super().__init__(f"no TEE evidence provider ({reason})", hint)


class TsmFs(Protocol):
    """The few filesystem operations configfs-tsm needs (tests lay the ABI out in a folder)."""

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
        with open(path, "wb", buffering=0) as f:  # one write(2): configfs takes it whole
            f.write(data)

    def exists(self, path: Path) -> bool:
        return path.exists()


def _errno_name(exc: OSError) -> str:
    name = errno.errorcode.get(exc.errno or 0, "")
    return f"{exc.strerror or exc}" + (f", {name}" if name else "")


class ConfigfsTsm:
    """One report per fresh entry under configfs-tsm, from the provider of the TEE asked for."""

    def __init__(
        self,
        root: Path = TSM_ROOT,
        fs: TsmFs | None = None,
        *,
        tee: str,
        vmpl: int | None = None,
        tries: int = TSM_TRIES,
    ) -> None:
        if tee not in PROVIDERS:
            raise EvidenceError(f"configfs-tsm gives tdx or snp evidence, not {tee!r}")
        self.root = root
        self.fs = fs or OsFs()
        self.tee = tee
        self.vmpl = vmpl  # SNP: the VMPL to report at; None: the provider's floor
        self.tries = tries
        self.provider = ""

    def available(self) -> bool:
        return self.fs.exists(self.root)

    def probe(self) -> str:
        """Make and drop one entry: the provider's name, or NoEvidenceProvider / EvidenceError
        (a provider of the other TEE) before anything is asked of the broker."""
        entry = self._mkdir()
        try:
            return self._provider(entry)
        finally:
            with contextlib.suppress(OSError):
                self.fs.rmdir(entry)

    def collect(self, report_data: bytes) -> dict[str, Any]:
        if len(report_data) != TSM_INBLOB_MAX:
            raise EvidenceError(
                f"report data must be {TSM_INBLOB_MAX} bytes (configfs-tsm inblob holds at most "
                f"{TSM_INBLOB_MAX}), not {len(report_data)}"
            )
        entry = self._mkdir()
        try:
            self.provider = self._provider(entry)
            outblob, aux = self._report(entry, report_data)
        finally:
            with contextlib.suppress(OSError):
                self.fs.rmdir(entry)
        if self.tee == "tdx":
            return {"quote": _b64(outblob), "cc_eventlog": None}
        if len(outblob) < SNP_REPORT_SIZE:
            raise EvidenceError(f"configfs-tsm: SNP report of {len(outblob)} bytes")
        evidence: dict[str, Any] = {"attestation_report": _b64(outblob[:SNP_REPORT_SIZE])}
        if aux.strip(b"\0"):
            evidence["cert_chain"] = parse_cert_table(aux)
        return evidence

    def _mkdir(self) -> Path:
        entry = self.root / f"gcvm-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            self.fs.mkdir(entry)
        except FileNotFoundError:
            raise NoEvidenceProvider(f"{self.root} is absent") from None
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                raise NoEvidenceProvider(
                    f"configfs-tsm has no provider: mkdir {entry} failed with ENXIO; neither "
                    "tdx_guest nor sev_guest is loaded, so this is no TD or SNP guest"
                ) from None
            why = _errno_name(exc)
            raise EvidenceError(f"configfs-tsm: cannot create {entry}: {why}") from None
        return entry

    def _provider(self, entry: Path) -> str:
        provider = self._read(entry, "provider").decode(errors="replace").strip()
        if provider != PROVIDERS[self.tee]:
            raise EvidenceError(
                f"configfs-tsm provider is {provider!r}, not {PROVIDERS[self.tee]!r}: this guest "
                f"cannot give the {self.tee} evidence asked for"
            )
        return provider

    def _report(self, entry: Path, report_data: bytes) -> tuple[bytes, bytes]:
        """Write the options and inblob, read outblob (and auxblob); redo it while `generation`
        says someone else wrote to the entry meanwhile, refuse after `tries`."""
        for _ in range(self.tries):
            before = self._generation(entry)
            writes = 0
            privlevel = self._privlevel(entry)
            if privlevel is not None:
                self._write(entry, "privlevel", str(privlevel).encode())
                writes += 1
            self._write(entry, "inblob", report_data)
            writes += 1
            outblob = self._read(entry, "outblob")
            aux = self._read(entry, "auxblob") if self._has(entry, "auxblob") else b""
            if self._generation(entry) == before + writes:
                return outblob, aux
        raise EvidenceError(
            f"configfs-tsm: another writer changed {entry.name} during each of {self.tries} "
            "tries (its generation moved); refused"
        )

    def _privlevel(self, entry: Path) -> int | None:
        """SNP's VMPL to write: the one asked for, else the floor where it is above 0."""
        if not self._has(entry, "privlevel"):  # TDX, and SNP kernels without VMPL support
            if self.vmpl:
                raise EvidenceError(f"configfs-tsm: {self.provider} has no privlevel to set")
            return None
        floor = 0
        if self._has(entry, "privlevel_floor"):
            floor = _int(self._read(entry, "privlevel_floor"), "privlevel_floor")
        level = floor if self.vmpl is None else self.vmpl
        if not floor <= level <= 3:
            raise EvidenceError(f"configfs-tsm: VMPL {level} is outside {floor}..3")
        return level if level or self.vmpl is not None else None

    def _generation(self, entry: Path) -> int:
        return _int(self._read(entry, "generation"), "generation")

    def _has(self, entry: Path, name: str) -> bool:
        return self.fs.exists(entry / name)

    def _read(self, entry: Path, name: str) -> bytes:
        try:
            return self.fs.read(entry / name)
        except OSError as exc:
            raise self._failed(entry, f"reading {name}", exc) from None

    def _write(self, entry: Path, name: str, data: bytes) -> None:
        try:
            self.fs.write(entry / name, data)
        except OSError as exc:
            raise self._failed(entry, f"writing {name}", exc) from None

    def _failed(self, entry: Path, what: str, exc: OSError) -> EvidenceError:
        if exc.errno in (errno.ENOENT, errno.ENXIO, errno.ENOTTY):
            return EvidenceError(
                f"configfs-tsm: the evidence provider went away ({what} of {entry.name}: "
                f"{_errno_name(exc)})"
            )
        return EvidenceError(f"configfs-tsm: {what} of {entry.name} failed: {_errno_name(exc)}")


def _int(raw: bytes, what: str) -> int:
    try:
        return int(raw.strip() or b"-")
    except ValueError:
        raise EvidenceError(f"configfs-tsm: {what} is not a number: {raw[:20]!r}") from None


# --- /dev/sev-guest ------------------------------------------------------------------------
# include/uapi/linux/sev-guest.h: struct snp_guest_request_ioctl {u8 msg_version; u64 req_data;
# u64 resp_data; u32 fw_error; u32 vmm_error} (32 bytes); snp_report_req {u8 user_data[64];
# u32 vmpl; u8 rsvd[28]}; snp_ext_report_req {snp_report_req data; u64 certs_address;
# u32 certs_len} (certs_len a multiple of 4096; too small: EINVAL, vmm_error 1 and the length
# needed written back); snp_report_resp {u8 data[4000]} = MSG_REPORT_RSP {u32 status;
# u32 report_size; u8 rsvd[24]; report}.


def _iowr(nr: int, size: int = 32) -> int:
    return (3 << 30) | (size << 16) | (ord("S") << 8) | nr


SNP_GET_REPORT = _iowr(0x0)
SNP_GET_EXT_REPORT = _iowr(0x2)
SNP_VMM_ERR_INVALID_LEN = 1
CERTS_PAGES = 4  # the first try's certificate buffer (pages); the kernel says when it is short
Ioctl = Callable[[int, int, bytearray], Any]


class SevGuestDevice:
    """/dev/sev-guest, for SNP guest kernels without configfs-tsm: SNP_GET_EXT_REPORT (report
    and the host's certificate table), SNP_GET_REPORT where `extended` is off (a report alone:
    the broker then takes the VCEK from its own --certs cache)."""

    tee = "snp"

    def __init__(
        self,
        path: Path = SEV_GUEST,
        ioctl: Ioctl | None = None,
        opener: Callable[[Path], int] | None = None,
        vmpl: int = 0,
        extended: bool = True,
    ) -> None:
        self.path = path
        self.vmpl = vmpl
        self.extended = extended
        self._ioctl = ioctl
        self._open = opener or (lambda p: os.open(p, os.O_RDWR))

    def available(self) -> bool:
        return self.path.exists()

    def collect(self, report_data: bytes) -> dict[str, Any]:
        import ctypes

        if len(report_data) != 64:
            raise EvidenceError("report data must be 64 bytes")
        report_req = report_data + struct.pack("<I", self.vmpl) + bytes(28)
        response = ctypes.create_string_buffer(4000)
        try:
            fd = self._open(self.path)
        except OSError as exc:
            raise EvidenceError(f"cannot open {self.path}: {exc.strerror}") from None
        try:
            if not self.extended:
                self._call(fd, SNP_GET_REPORT, "SNP_GET_REPORT", report_req, response)
                certs = b""
            else:
                certs = self._extended(fd, report_req, response)
        finally:
            os.close(fd)
        status, size = struct.unpack_from("<II", response.raw, 0)
        if status != 0 or size < SNP_REPORT_SIZE:
            raise EvidenceError(f"SNP report: status 0x{status:x}, report size {size}")
        evidence: dict[str, Any] = {
            "attestation_report": _b64(response.raw[32 : 32 + SNP_REPORT_SIZE])
        }
        if certs.strip(b"\0"):
            evidence["cert_chain"] = parse_cert_table(certs)
        return evidence

    def _extended(self, fd: int, report_req: bytes, response: Any) -> bytes:
        import ctypes

        pages = CERTS_PAGES
        for _ in range(2):
            certs = ctypes.create_string_buffer(pages * 4096)
            request = report_req + struct.pack("<QI4x", ctypes.addressof(certs), len(certs))
            try:
                self._call(fd, SNP_GET_EXT_REPORT, "SNP_GET_EXT_REPORT", request, response)
                return certs.raw
            except _ShortCerts as short:
                pages = max(pages + 1, -(-short.needed // 4096))
        raise EvidenceError("SNP_GET_EXT_REPORT: the host's certificate table kept growing")

    def _call(self, fd: int, number: int, name: str, request: bytes, response: Any) -> None:
        import ctypes
        import fcntl

        req = ctypes.create_string_buffer(request, len(request))
        arg = bytearray(
            struct.pack("<B7xQQQ", 1, ctypes.addressof(req), ctypes.addressof(response), 0)
        )
        try:
            (self._ioctl or fcntl.ioctl)(fd, number, arg)
        except OSError as exc:
            fw_error, vmm_error = struct.unpack_from("<II", arg, 24)
            if number == SNP_GET_EXT_REPORT and vmm_error == SNP_VMM_ERR_INVALID_LEN:
                raise _ShortCerts(struct.unpack_from("<I", req.raw, 104)[0]) from None
            raise EvidenceError(
                f"{name} failed: {exc.strerror} (firmware 0x{fw_error:x}, VMM 0x{vmm_error:x})"
            ) from None


class _ShortCerts(Exception):
    def __init__(self, needed: int) -> None:
        self.needed = needed


class NoEvidence:
    """`--tee none`: no hardware evidence; only a broker started with --insecure-no-attestation
    releases a key to it (and says so)."""

    tee = "sample"

    def collect(self, report_data: bytes) -> dict[str, Any]:
        return {"svn": "0", "report_data": _b64(report_data)}


def detect(
    tee: str,
    tsm_root: Path | None = None,
    sev_guest: Path | None = None,
    fs: TsmFs | None = None,
) -> EvidenceSource:
    """The evidence source for the guest's TEE, checked before the broker is asked: configfs-tsm
    with the provider of that TEE, else /dev/sev-guest for SNP; NoEvidenceProvider (one line,
    with the reason) where the guest has none."""
    if tee == "none":
        return NoEvidence()
    tee = "snp" if tee == "sev-snp" else tee
    root = tsm_root or TSM_ROOT
    device = sev_guest or SEV_GUEST
    fallback = tee == "snp" and device.exists()
    tsm = ConfigfsTsm(root, fs, tee=tee)
    if not tsm.available():
        if fallback:
            return SevGuestDevice(device)
        raise NoEvidenceProvider(_why_no_tsm(root) + _and_no_device(tee, device))
    try:
        tsm.probe()
    except NoEvidenceProvider:
        if fallback:
            return SevGuestDevice(device)
        raise
    return tsm


def _why_no_tsm(root: Path) -> str:
    config = root.parents[1]  # /sys/kernel/config
    if not config.is_dir() or not any(config.iterdir()):
        return f"configfs is not mounted at {config}"
    if not root.parent.exists():
        return (f"{root.parent} is absent: the kernel has no configfs-tsm (TSM_REPORTS) or its "
                "tsm module is not loaded")  # fmt: skip
    return f"{root} is absent"


def _and_no_device(tee: str, device: Path) -> str:
    return f"; {device} is absent" if tee == "snp" else ""
