"""What the host can run: versions, KVM (probed), TCG, TDX, SEV-SNP and their firmware.

Sources, in order of trust:
- libvirt (`getDomainCapabilities`, `getCapabilities`, versions) through a connection the caller
  opened (`probe(conn)`), or a captured domcapabilities file (`HostCaps.from_domcaps_xml`);
- sysfs: `/sys/module/kvm_intel/parameters/tdx` and `/sys/module/kvm_amd/parameters/sev_snp`
  (libvirt 11.6-11.9 reports TDX on hosts without it, so the kernel's flag is required too);
- QEMU itself when no libvirt daemon runs (`probe_qemu`): `-accel help`, `-object help`,
  `-machine help`, `--version`;
- a real guest: the KVM probe boots a 64 KiB BIOS image (kvmprobe.S) into long mode under
  `-accel kvm` with a short time limit, because some hosts' /dev/kvm exists but hangs ordinary
  guests. The answer is cached per kernel release and QEMU version;
- QEMU's firmware descriptors (`/usr/share/qemu/firmware/*.json`, overridable from
  `/etc/qemu/firmware`) for the TDX and SNP firmware paths, which differ by distribution.
"""

from __future__ import annotations

import contextlib
import grp
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from orchestrator.errors import HostUnsupported, UsageError
from orchestrator.paths import cache_root
from orchestrator.spec import Tee
from orchestrator.ui import log

Version = tuple[int, int, int]

QEMU_BINARY = "qemu-system-x86_64"
KVM_DEVICE = Path("/dev/kvm")
KVM_PROBE_TIMEOUT_S = 10.0
FIRMWARE_DIRS = (Path("/etc/qemu/firmware"), Path("/usr/share/qemu/firmware"))
NO_DAEMON_NOTE = "libvirt daemon not running (gcvm up starts a private one)"

# Floors from the design note (confidential-vms.md): libvirt, QEMU, host kernel.
FLOORS: dict[Tee, dict[str, Version]] = {
    Tee.tdx: {"libvirt": (11, 6, 0), "qemu": (10, 1, 0), "kernel": (6, 16, 0)},
    Tee.sev_snp: {"libvirt": (10, 5, 0), "qemu": (9, 1, 0), "kernel": (6, 11, 0)},
}
# libvirt releases that report TDX on hosts without it.
TDX_FALSE_POSITIVE = ((11, 6, 0), (11, 9, 99))


# --------------------------------------------------------------------------------------------
# Small value types


@dataclass(frozen=True)
class Check:
    """One fact about the host: ok True/False, or None when it could not be known."""

    name: str
    ok: bool | None
    detail: str
    fix: str = ""


@dataclass(frozen=True)
class TdxCaps:
    supported: bool
    checks: tuple[Check, ...] = ()

    @property
    def reasons(self) -> tuple[str, ...]:
        return tuple(f"{c.name}: {c.detail}" for c in self.checks if c.ok is False)


@dataclass(frozen=True)
class SnpCaps:
    supported: bool
    cbitpos: int | None = None
    reduced_phys_bits: int | None = None
    checks: tuple[Check, ...] = ()

    @property
    def reasons(self) -> tuple[str, ...]:
        return tuple(f"{c.name}: {c.detail}" for c in self.checks if c.ok is False)


@dataclass(frozen=True)
class KvmProbe:
    usable: bool
    reason: str
    cached: bool = False
    seconds: float | None = None


@dataclass(frozen=True)
class Firmware:
    """Firmware images per TEE, from QEMU's firmware descriptors (or a captured file)."""

    tdx: Path | None = None
    sev_snp: Path | None = None
    efi: Path | None = None  # plain UEFI; the no-TEE domain boots the kernel directly instead

    def for_tee(self, tee: Tee) -> Path | None:
        return {Tee.tdx: self.tdx, Tee.sev_snp: self.sev_snp, Tee.none: None}[tee]


@dataclass(frozen=True)
class Sysfs:
    """The kernel's module parameters under `root` (tests point it at a fake tree)."""

    root: Path = Path("/")
    known: tuple[tuple[str, str], ...] | None = None  # (module, param) that are Y; no reading

    def flag(self, module: str, param: str) -> bool | None:
        """True for Y/1, False for N/0; None when the module is not loaded."""
        if self.known is not None:
            return (module, param) in self.known
        path = self.root / "sys" / "module" / module / "parameters" / param
        try:
            value = path.read_text().strip()
        except OSError:
            return None
        return value in ("Y", "y", "1")


@dataclass(frozen=True)
class HostCaps:
    source: str  # where the facts came from, in words
    arch: str
    emulator: str
    libvirt_version: Version | None
    qemu_version: Version | None
    kernel_release: str | None
    machines: tuple[str, ...]
    kvm_present: bool
    kvm_usable: bool
    kvm_reason: str
    tcg_available: bool
    tdx: TdxCaps
    snp: SnpCaps
    firmware: Firmware = field(default_factory=Firmware)
    domcaps_xml: str | None = None
    libvirt_daemon: bool = False  # the facts came through a libvirt connection
    notes: tuple[str, ...] = ()
    kvm_cached: bool = False  # kvm_usable is a cached probe answer

    def supports(self, tee: Tee) -> bool:
        return {Tee.none: True, Tee.tdx: self.tdx.supported, Tee.sev_snp: self.snp.supported}[tee]

    @classmethod
    def from_domcaps_xml(
        cls,
        text: str,
        *,
        source: str = "captured domcapabilities",
        libvirt_version: Version | None = None,
        qemu_version: Version | None = None,
        kernel_release: str | None = None,
        sysfs: Sysfs | None = None,
        kvm: KvmProbe | None = None,
        firmware: Firmware | None = None,
        machines: tuple[str, ...] | None = None,
        tcg_available: bool = True,
        notes: tuple[str, ...] = (),
    ) -> HostCaps:
        """Host caps from a domcapabilities document. Facts the document cannot hold (sysfs
        flags, the KVM probe, versions) are taken from the arguments, or left unknown."""
        dc = DomCaps.parse(text)
        qemu_version = qemu_version or dc.qemu_version_from_machine()
        if kvm is None:
            kvm = KvmProbe(
                usable=dc.domain == "kvm",
                reason=f"libvirt reports domain type {dc.domain!r} (not probed)",
            )
        tdx_flag = sysfs.flag("kvm_intel", "tdx") if sysfs else None
        snp_flag = sysfs.flag("kvm_amd", "sev_snp") if sysfs else None
        if sysfs is not None:
            tdx_flag = bool(tdx_flag)
            snp_flag = bool(snp_flag)
        return cls(
            source=source,
            arch=dc.arch,
            emulator=dc.path,
            libvirt_version=libvirt_version,
            qemu_version=qemu_version,
            kernel_release=kernel_release,
            machines=machines if machines is not None else ((dc.machine,) if dc.machine else ()),
            kvm_present=dc.domain == "kvm",
            kvm_usable=kvm.usable,
            kvm_reason=kvm.reason,
            tcg_available=tcg_available,
            tdx=tdx_caps(
                sectype="tdx" in dc.sectypes or dc.tdx_feature,
                sysfs_flag=tdx_flag,
                libvirt_version=libvirt_version,
                qemu_version=qemu_version,
                kernel_release=kernel_release,
            ),
            snp=snp_caps(
                sectype="sev-snp" in dc.sectypes,
                sysfs_flag=snp_flag,
                cbitpos=dc.cbitpos,
                reduced_phys_bits=dc.reduced_phys_bits,
                libvirt_version=libvirt_version,
                qemu_version=qemu_version,
                kernel_release=kernel_release,
            ),
            firmware=firmware if firmware is not None else dc.firmware_guess(),
            domcaps_xml=text,
            notes=notes,
            kvm_cached=kvm.cached,
        )

    @classmethod
    def from_file(cls, path: Path) -> HostCaps:
        try:
            text = path.read_text()
        except OSError as exc:
            raise UsageError(f"cannot read --host-caps {path}: {exc.strerror}") from None
        try:
            return cls.from_domcaps_xml(text, source=f"captured domcapabilities {path}")
        except ValueError as exc:
            raise UsageError(
                f"--host-caps {path} is not a libvirt domcapabilities document: {exc}",
                hint="capture one with `virsh domcapabilities --machine q35 > FILE`",
            ) from None


# --------------------------------------------------------------------------------------------
# domcapabilities


@dataclass(frozen=True)
class DomCaps:
    path: str
    domain: str
    machine: str
    arch: str
    sectypes: tuple[str, ...]
    tdx_feature: bool
    sev_supported: bool
    cbitpos: int | None
    reduced_phys_bits: int | None
    loaders: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> DomCaps:
        try:
            root = ET.fromstring(text)
        except ET.ParseError as exc:
            raise ValueError(f"not XML ({exc})") from None
        if root.tag != "domainCapabilities":
            raise ValueError(f"root element is <{root.tag}>, not <domainCapabilities>")
        sev = root.find("features/sev")
        sev_ok = sev is not None and sev.get("supported") == "yes"
        tdx = root.find("features/tdx")
        return cls(
            path=root.findtext("path", QEMU_BINARY).strip(),
            domain=root.findtext("domain", "").strip(),
            machine=root.findtext("machine", "").strip(),
            arch=root.findtext("arch", "").strip(),
            sectypes=tuple(
                (v.text or "").strip()
                for v in root.findall("features/launchSecurity/enum[@name='sectype']/value")
            )
            if root.find("features/launchSecurity[@supported='yes']") is not None
            else (),
            tdx_feature=tdx is not None and tdx.get("supported") == "yes",
            sev_supported=sev_ok,
            cbitpos=_int_or_none(sev.findtext("cbitpos")) if sev_ok and sev is not None else None,
            reduced_phys_bits=_int_or_none(sev.findtext("reducedPhysBits"))
            if sev_ok and sev is not None
            else None,
            loaders=tuple((v.text or "").strip() for v in root.findall("os/loader/value")),
        )

    def qemu_version_from_machine(self) -> Version | None:
        """`pc-q35-10.1` names the QEMU release that introduced it: a floor for QEMU's version."""
        m = re.search(r"-(\d+)\.(\d+)$", self.machine)
        return (int(m.group(1)), int(m.group(2)), 0) if m else None

    def firmware_guess(self) -> Firmware:
        """Firmware from the loader paths libvirt lists, matched by the names distributions
        give the TDX and AMD SEV builds (a captured file holds no descriptors)."""

        def pick(*needles: str) -> Path | None:
            for value in self.loaders:
                name = Path(value).name.lower()
                if any(n in name for n in needles):
                    return Path(value)
            return None

        return Firmware(tdx=pick("tdx"), sev_snp=pick("amdsev", "sev"), efi=None)


def _int_or_none(text: str | None) -> int | None:
    try:
        return int((text or "").strip())
    except ValueError:
        return None


# --------------------------------------------------------------------------------------------
# TEE checks


def parse_version(text: str | None) -> Version | None:
    m = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", text or "")
    if not m:
        return None
    return int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)


def libvirt_number_to_version(number: int) -> Version:
    return number // 1_000_000, number // 1000 % 1000, number % 1000


def fmt_version(version: Version | None) -> str:
    return ".".join(map(str, version)) if version else "unknown"


def _floor_checks(tee: Tee, versions: dict[str, Version | None]) -> list[Check]:
    names = {"libvirt": "libvirt", "qemu": "QEMU", "kernel": "host kernel"}
    fixes = {
        "libvirt": "install a newer libvirt (distribution backports or a TDX/SNP-enabled build)",
        "qemu": "install a newer QEMU (distribution backports or a TDX/SNP-enabled build)",
        "kernel": "boot a newer host kernel with the vendor's TEE support",
    }
    checks = []
    for key, floor in FLOORS[tee].items():
        have = versions.get(key)
        label = f"{names[key]} >= {fmt_version(floor)}"
        if have is None:
            checks.append(Check(label, None, "version unknown", fixes[key]))
        else:
            checks.append(Check(label, have >= floor, f"found {fmt_version(have)}", fixes[key]))
    return checks


def tdx_caps(
    *,
    sectype: bool,
    sysfs_flag: bool | None,
    libvirt_version: Version | None,
    qemu_version: Version | None,
    kernel_release: str | None,
) -> TdxCaps:
    checks = [
        Check(
            "TDX launch security",
            sectype,
            "offered by libvirt/QEMU" if sectype else "not offered by libvirt/QEMU",
            "needs QEMU >= 10.1 and libvirt >= 11.6 built with TDX, on a TDX host",
        ),
        Check(
            "kvm_intel tdx=Y",
            sysfs_flag,
            {True: "enabled", False: "not enabled (or kvm_intel not loaded)", None: "not known"}[
                sysfs_flag
            ],
            "enable TDX in the BIOS, boot with kvm_intel.tdx=1 and check dmesg for "
            "'virt/tdx: module initialized'",
        ),
        *_floor_checks(
            Tee.tdx,
            {
                "libvirt": libvirt_version,
                "qemu": qemu_version,
                "kernel": parse_version(kernel_release),
            },
        ),
    ]
    if (
        sectype
        and sysfs_flag is None
        and libvirt_version is not None
        and TDX_FALSE_POSITIVE[0] <= libvirt_version <= TDX_FALSE_POSITIVE[1]
    ):
        checks.append(
            Check(
                "TDX report trustworthy",
                None,
                f"libvirt {fmt_version(libvirt_version)} reports TDX on hosts without it",
                "confirm /sys/module/kvm_intel/parameters/tdx = Y on that host",
            )
        )
    return TdxCaps(supported=all(c.ok is not False for c in checks), checks=tuple(checks))


def snp_caps(
    *,
    sectype: bool,
    sysfs_flag: bool | None,
    cbitpos: int | None,
    reduced_phys_bits: int | None,
    libvirt_version: Version | None,
    qemu_version: Version | None,
    kernel_release: str | None,
) -> SnpCaps:
    have_bits = cbitpos is not None and reduced_phys_bits is not None
    checks = [
        Check(
            "SEV-SNP launch security",
            sectype,
            "offered by libvirt/QEMU" if sectype else "not offered by libvirt/QEMU",
            "needs QEMU >= 9.1 and libvirt >= 10.5 on an SNP-enabled AMD EPYC host",
        ),
        Check(
            "kvm_amd sev_snp=Y",
            sysfs_flag,
            {True: "enabled", False: "not enabled (or kvm_amd not loaded)", None: "not known"}[
                sysfs_flag
            ],
            "enable SEV-SNP in the BIOS (SNP firmware >= 1.51) and load kvm_amd with sev_snp=1",
        ),
        Check(
            "SEV cbitpos/reducedPhysBits",
            have_bits if sectype else None,
            f"cbitpos {cbitpos}, reducedPhysBits {reduced_phys_bits}"
            if have_bits
            else "not reported",
            "libvirt reports them in domcapabilities features/sev on an SEV host",
        ),
        *_floor_checks(
            Tee.sev_snp,
            {
                "libvirt": libvirt_version,
                "qemu": qemu_version,
                "kernel": parse_version(kernel_release),
            },
        ),
    ]
    return SnpCaps(
        supported=all(c.ok is not False for c in checks) and sectype,
        cbitpos=cbitpos,
        reduced_phys_bits=reduced_phys_bits,
        checks=tuple(checks),
    )


# --------------------------------------------------------------------------------------------
# Firmware descriptors (QEMU's docs/interop/firmware.json)


def firmware_descriptors(dirs: tuple[Path, ...] = FIRMWARE_DIRS) -> list[dict[str, Any]]:
    """Descriptors in priority order; a file name in an earlier folder hides the same name in a
    later one, and an empty file disables a descriptor (QEMU's rules)."""
    chosen: dict[str, Path] = {}
    for folder in reversed(dirs):
        if folder.is_dir():
            for path in folder.glob("*.json"):
                chosen[path.name] = path
    out = []
    for name in sorted(chosen):
        path = chosen[name]
        try:
            if path.stat().st_size == 0:
                continue
            out.append(json.loads(path.read_text()) | {"_file": str(path)})
        except (OSError, ValueError) as exc:
            log.debug("skipping firmware descriptor %s: %s", path, exc)
    return out


def _descriptor_image(desc: dict[str, Any]) -> Path | None:
    mapping = desc.get("mapping", {})
    if mapping.get("device") == "memory":
        name = mapping.get("filename")
    else:
        name = (mapping.get("executable") or {}).get("filename")
    return Path(name) if name else None


def _for_x86_64(desc: dict[str, Any]) -> bool:
    return any(t.get("architecture") == "x86_64" for t in desc.get("targets", []))


def find_firmware(descriptors: list[dict[str, Any]]) -> Firmware:
    tdx = snp = efi = None
    for desc in descriptors:
        if not _for_x86_64(desc) or "uefi" not in desc.get("interface-types", []):
            continue
        features = set(desc.get("features", []))
        image = _descriptor_image(desc)
        if image is None:
            continue
        if tdx is None and "intel-tdx" in features:
            tdx = image
        if snp is None and "amd-sev-snp" in features:
            snp = image
        if efi is None and not features & {"secure-boot", "intel-tdx", "amd-sev-snp"}:
            efi = image
    return Firmware(tdx=tdx, sev_snp=snp, efi=efi)


# --------------------------------------------------------------------------------------------
# /dev/kvm permissions and the KVM probe

_PROBE_CODE = bytes.fromhex(
    "fabaf803b052ee31c08ed82e660f0116c0000f20c06683c8010f22c066ea24000f00080066b810008ed88ec0"
    "8ed066baf803b050eebf0010000031c0b900300000f3aac7050010000003200000c705002000000330000"
    "0c7050030000083000000b8001000000f22d80f20e083c8200f22e0b9800000c00f320d000100000f300f2"
    "0c00d000000800f22c0ea92000f00180066baf803b04ceeb021e6f4f4ebfd0000000000000000ffff000000"
    "9acf00ffff00000092cf00ffff0000009aaf001f00a0000f00"
)
_PROBE_RESET_VECTOR = bytes.fromhex("ea000000f0")  # ljmp $0xf000, $0
_PROBE_EXIT_CODE = (0x21 << 1) | 1
_PROBE_STAGES = {"": "before real mode", "R": "real mode", "P": "protected mode", "L": "long mode"}


def probe_image() -> bytes:
    """The 64 KiB BIOS image assembled from kvmprobe.S (hlt-filled, reset vector at 0xfff0)."""
    image = bytearray(b"\xf4" * 0x10000)
    image[: len(_PROBE_CODE)] = _PROBE_CODE
    image[0xFFF0 : 0xFFF0 + len(_PROBE_RESET_VECTOR)] = _PROBE_RESET_VECTOR
    return bytes(image)


def fix_kvm_permissions(device: Path = KVM_DEVICE) -> str | None:
    """Without udev, /dev/kvm is root:root 0600 and libvirt re-probes QEMU on every call (about
    45 s each). As root, make it root:kvm 0660. Returns what was changed, or None."""
    if os.geteuid() != 0 or not device.exists():
        return None
    try:
        kvm_gid = grp.getgrnam("kvm").gr_gid
    except KeyError:
        return None
    st = device.stat()
    if st.st_gid == kvm_gid and st.st_mode & 0o660 == 0o660:
        return None
    before = f"{grp.getgrgid(st.st_gid).gr_name} {oct(st.st_mode & 0o777)}"
    os.chown(device, 0, kvm_gid)
    os.chmod(device, 0o660)
    change = f"{device}: {before} -> kvm 0o660"
    log.info("fixed permissions: %s", change)
    return change


def run_probe_guest(qemu: str, accel: str, timeout: float = KVM_PROBE_TIMEOUT_S) -> KvmProbe:
    """Boot the probe image under `accel` (kvm or tcg); usable when it reaches long mode and
    exits through isa-debug-exit before `timeout`."""
    with tempfile.TemporaryDirectory(prefix="gcvm-kvmprobe-") as tmp:
        bios = Path(tmp) / "probe.bin"
        serial = Path(tmp) / "serial.log"
        bios.write_bytes(probe_image())
        argv = [
            qemu,
            "-accel",
            accel,
            "-M",
            "q35",
            "-m",
            "16",
            "-nodefaults",
            "-display",
            "none",
            "-no-reboot",
            "-bios",
            str(bios),
            "-serial",
            f"file:{serial}",
            "-device",
            "isa-debug-exit,iobase=0xf4,iosize=0x04",
        ]
        log.debug("run: %s", " ".join(argv))
        start = time.monotonic()
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
        except OSError as exc:
            return KvmProbe(False, f"cannot run {qemu}: {exc.strerror}")
        try:
            _, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            stage = _PROBE_STAGES.get(_read_stage(serial), "unknown")
            return KvmProbe(
                False,
                f"a test guest under {accel.upper()} did not finish within {timeout:.0f} s "
                f"(stopped in {stage})",
                seconds=time.monotonic() - start,
            )
        elapsed = time.monotonic() - start
        if proc.returncode == _PROBE_EXIT_CODE:
            return KvmProbe(
                True, f"a test guest reached long mode in {elapsed:.2f} s", seconds=elapsed
            )
        tail = stderr.decode(errors="replace").strip().splitlines()[-1:] or ["no message"]
        return KvmProbe(
            False, f"QEMU exited with status {proc.returncode}: {tail[0]}", seconds=elapsed
        )


def _read_stage(serial: Path) -> str:
    try:
        return serial.read_text(errors="replace")[-1:]
    except OSError:
        return ""


def _probe_cache_file() -> Path:
    return cache_root() / "hostcaps" / "kvm-probe.json"


def kvm_probe(
    qemu: str = QEMU_BINARY,
    *,
    qemu_version: Version | None = None,
    timeout: float = KVM_PROBE_TIMEOUT_S,
    use_cache: bool = True,
    device: Path = KVM_DEVICE,
) -> KvmProbe:
    """Whether KVM really runs a guest here; cached per kernel release and QEMU version."""
    if not device.exists():
        return KvmProbe(False, f"{device} does not exist (no KVM in this kernel or VM)")
    if not os.access(device, os.R_OK | os.W_OK):
        return KvmProbe(False, f"no read/write access to {device}")
    version = qemu_version or qemu_binary_version(qemu)
    key = f"{os.uname().release} qemu-{fmt_version(version)}"
    cache = _probe_cache_file()
    entries: dict[str, Any] = {}
    if use_cache:
        with contextlib.suppress(OSError, ValueError):
            entries = json.loads(cache.read_text())
        if isinstance(entries.get(key), dict):
            hit = entries[key]
            return KvmProbe(
                bool(hit["usable"]), str(hit["reason"]), cached=True, seconds=hit.get("seconds")
            )
    result = run_probe_guest(qemu, "kvm", timeout)
    entries[key] = {
        "usable": result.usable,
        "reason": result.reason,
        "seconds": result.seconds,
        "probed_at": time.time(),
    }
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        tmp.write_text(json.dumps(entries, indent=1, sort_keys=True) + "\n")
        tmp.replace(cache)
    except OSError as exc:
        log.debug("cannot write %s: %s", cache, exc)
    return result


def forget_kvm_probe() -> None:
    """Drop every cached KVM probe answer (the next probe boots the test guest again)."""
    with contextlib.suppress(FileNotFoundError):
        _probe_cache_file().unlink()


def cached_kvm_probe(qemu_version: Version | None) -> KvmProbe | None:
    """The cached answer for this kernel and QEMU, without probing."""
    key = f"{os.uname().release} qemu-{fmt_version(qemu_version)}"
    try:
        hit = json.loads(_probe_cache_file().read_text()).get(key)
    except (OSError, ValueError):
        return None
    if not isinstance(hit, dict):
        return None
    return KvmProbe(
        bool(hit["usable"]), str(hit["reason"]), cached=True, seconds=hit.get("seconds")
    )


def _kvm_answer(qemu: str, qemu_version: Version | None, run_probe: bool) -> KvmProbe:
    if run_probe:
        return kvm_probe(qemu, qemu_version=qemu_version)
    cached = cached_kvm_probe(qemu_version)
    if cached is not None:
        return cached
    present = KVM_DEVICE.exists()
    return KvmProbe(present, f"{KVM_DEVICE} {'exists' if present else 'missing'} (not probed)")


# --------------------------------------------------------------------------------------------
# QEMU directly


def _qemu_out(qemu: str, *args: str) -> str:
    try:
        proc = subprocess.run(
            [qemu, *args],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.debug("%s %s failed: %s", qemu, " ".join(args), exc)
        return ""
    return proc.stdout


def qemu_binary_version(qemu: str = QEMU_BINARY) -> Version | None:
    return parse_version(_qemu_out(qemu, "--version"))


def _qemu_list(qemu: str, *args: str) -> list[str]:
    """First words of the lines after the heading of a QEMU `help` listing."""
    lines = _qemu_out(qemu, *args).splitlines()
    return [ln.split()[0] for ln in lines[1:] if ln.strip()]


def _libvirt_library_version() -> Version | None:
    try:
        import libvirt
    except ImportError:
        return None
    return libvirt_number_to_version(libvirt.getVersion())


def _firmware_or(firmware: Firmware | None) -> Firmware:
    return firmware if firmware is not None else find_firmware(firmware_descriptors())


def probe_qemu(
    qemu: str = QEMU_BINARY,
    *,
    kvm_probe: bool = True,
    sysfs: Sysfs | None = None,
    firmware: Firmware | None = None,
    notes: tuple[str, ...] = (NO_DAEMON_NOTE,),
) -> HostCaps:
    """Host caps without libvirt: asks the QEMU binary itself."""
    path = shutil.which(qemu)
    if path is None:
        raise HostUnsupported(
            f"{qemu} not found", hint="scripts/install-system-deps.sh installs QEMU"
        )
    sysfs = sysfs or Sysfs()
    version = qemu_binary_version(path)
    accels = set(_qemu_list(path, "-accel", "help"))
    objects = set(_qemu_list(path, "-object", "help"))
    machines = tuple(sorted(m for m in _qemu_list(path, "-machine", "help")))
    kvm = _kvm_answer(path, version, kvm_probe and "kvm" in accels)
    if "kvm" not in accels:
        kvm = KvmProbe(False, f"{path} has no KVM accelerator")
    libvirt_version = _libvirt_library_version()
    release = os.uname().release
    tdx_flag = bool(sysfs.flag("kvm_intel", "tdx"))
    snp_flag = bool(sysfs.flag("kvm_amd", "sev_snp"))
    return HostCaps(
        source=f"QEMU {fmt_version(version)} probed directly ({path})",
        arch=os.uname().machine,
        emulator=path,
        libvirt_version=libvirt_version,
        qemu_version=version,
        kernel_release=release,
        machines=machines,
        kvm_present=KVM_DEVICE.exists(),
        kvm_usable=kvm.usable,
        kvm_reason=kvm.reason,
        tcg_available="tcg" in accels,
        tdx=tdx_caps(
            sectype="tdx-guest" in objects,
            sysfs_flag=tdx_flag,
            libvirt_version=libvirt_version,
            qemu_version=version,
            kernel_release=release,
        ),
        snp=snp_caps(
            sectype="sev-snp-guest" in objects,
            sysfs_flag=snp_flag,
            cbitpos=None,
            reduced_phys_bits=None,
            libvirt_version=libvirt_version,
            qemu_version=version,
            kernel_release=release,
        ),
        firmware=_firmware_or(firmware),
        domcaps_xml=None,
        libvirt_daemon=False,
        notes=notes,
        kvm_cached=kvm.cached,
    )


def tcg_works(qemu: str = QEMU_BINARY) -> KvmProbe:
    """Run the probe guest under TCG (about 0.1 s): proves software emulation works."""
    return run_probe_guest(qemu, "tcg", timeout=KVM_PROBE_TIMEOUT_S)


# --------------------------------------------------------------------------------------------
# libvirt


def _is_local(uri: str) -> bool:
    parsed = urlparse(uri)
    return not parsed.hostname or parsed.hostname in ("localhost", "127.0.0.1", "::1")


def _caps_machines(caps_xml: str, arch: str) -> tuple[tuple[str, ...], bool]:
    root = ET.fromstring(caps_xml)
    machines: set[str] = set()
    tcg = False
    for guest in root.findall("guest"):
        node = guest.find(f"arch[@name='{arch}']")
        if node is None:
            continue
        machines |= {(m.text or "").strip() for m in node.findall("machine")}
        machines |= {(m.text or "").strip() for m in node.findall("domain/machine")}
        tcg = tcg or node.find("domain[@type='qemu']") is not None
    return tuple(sorted(m for m in machines if m)), tcg


def probe(conn: Any, *, kvm_probe: bool = True, sysfs: Sysfs | None = None) -> HostCaps:
    """Host caps through an open libvirt connection (`libvirt.virConnect`)."""
    import libvirt

    uri = conn.getURI()
    local = _is_local(uri)
    domain_type = "kvm" if KVM_DEVICE.exists() or not local else "qemu"
    try:
        domcaps = conn.getDomainCapabilities(None, "x86_64", "q35", domain_type, 0)
    except libvirt.libvirtError:
        domain_type = "qemu"
        domcaps = conn.getDomainCapabilities(None, "x86_64", "q35", "qemu", 0)
    qemu_version = libvirt_number_to_version(conn.getVersion())
    libvirt_version = libvirt_number_to_version(conn.getLibVersion())
    machines, tcg = _caps_machines(conn.getCapabilities(), "x86_64")
    notes: list[str] = []
    if local:
        emulator = DomCaps.parse(domcaps).path
        kvm = _kvm_answer(emulator, qemu_version, kvm_probe and domain_type == "kvm")
        if domain_type != "kvm":
            kvm = KvmProbe(False, f"libvirt offers no KVM domains ({KVM_DEVICE} missing)")
        sysfs = sysfs or Sysfs()
        firmware: Firmware | None = find_firmware(firmware_descriptors())
        release: str | None = os.uname().release
    else:
        kvm = None
        sysfs = None
        firmware = None
        release = None
        notes.append(f"{uri} is remote: sysfs flags, kernel and the KVM probe are not checked")
    caps = HostCaps.from_domcaps_xml(
        domcaps,
        source=f"libvirt {uri}",
        libvirt_version=libvirt_version,
        qemu_version=qemu_version,
        kernel_release=release,
        sysfs=sysfs,
        kvm=kvm,
        firmware=firmware,
        machines=machines,
        tcg_available=tcg,
        notes=tuple(notes),
    )
    return replace(caps, libvirt_daemon=True)


def open_libvirt(uri: str) -> Any:
    """Open `uri`, or raise HostUnsupported; libvirt's own error printing is silenced."""
    import libvirt

    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    try:
        return libvirt.open(uri)
    except libvirt.libvirtError as exc:
        raise HostUnsupported(
            f"cannot connect to libvirt at {uri}: {exc.get_error_message()}",
            hint="start libvirtd, or leave out --connect to let gcvm probe QEMU directly",
        ) from None


def detect(connect: str | None = None, *, kvm_probe: bool = True) -> HostCaps:
    """For doctor and render: `--connect URI` if given, else qemu:///system when a daemon
    answers, else QEMU probed directly (saying that no libvirt daemon runs)."""
    if connect:
        conn = open_libvirt(connect)
        try:
            return probe(conn, kvm_probe=kvm_probe)
        finally:
            conn.close()
    try:
        conn = open_libvirt("qemu:///system")
    except HostUnsupported:
        return probe_qemu(kvm_probe=kvm_probe)
    try:
        return probe(conn, kvm_probe=kvm_probe)
    finally:
        conn.close()
