"""/dev/kvm permissions and the KVM probe: a 64 KiB guest that must reach long mode."""

from __future__ import annotations

import contextlib
import grp
import json
import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from orchestrator.hostcaps.facts import KvmProbe
from orchestrator.hostcaps.qemu import QEMU_BINARY, qemu_binary_version
from orchestrator.hostcaps.versions import Version, fmt_version
from orchestrator.paths import cache_root
from orchestrator.ui import log

KVM_DEVICE = Path("/dev/kvm")
KVM_PROBE_TIMEOUT_S = 10.0

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


def tcg_works(qemu: str = QEMU_BINARY) -> KvmProbe:
    """Run the probe guest under TCG (about 0.1 s): proves software emulation works."""
    return run_probe_guest(qemu, "tcg", timeout=KVM_PROBE_TIMEOUT_S)
