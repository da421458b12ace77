"""Host caps without libvirt: QEMU asked directly."""

from __future__ import annotations

import os
import shutil

from orchestrator.errors import HostUnsupported
from orchestrator.hostcaps.facts import Firmware, KvmProbe, Sysfs
from orchestrator.hostcaps.firmware import find_firmware, firmware_descriptors
from orchestrator.hostcaps.kvm import KVM_DEVICE, _kvm_answer
from orchestrator.hostcaps.model import HostCaps
from orchestrator.hostcaps.qemu import QEMU_BINARY, _qemu_list, qemu_binary_version
from orchestrator.hostcaps.verdicts import snp_caps, tdx_caps
from orchestrator.hostcaps.versions import Version, fmt_version, libvirt_number_to_version

NO_DAEMON_NOTE = "libvirt daemon not running (gcvm up starts a private one)"


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
