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

The package keeps one job per module: `versions` (version numbers), `facts` (small value types),
`qemu` (the binary's version and listings), `domcaps` (libvirt's document), `verdicts` (TEE
checks), `firmware` (descriptors), `kvm` (/dev/kvm and the probe guest), `model` (HostCaps),
`direct` (QEMU without libvirt) and `connection` (through libvirt; `detect`). Import from the
package: `from orchestrator.hostcaps import HostCaps`.
"""

from orchestrator.hostcaps.connection import detect, open_libvirt, probe
from orchestrator.hostcaps.direct import NO_DAEMON_NOTE, probe_qemu
from orchestrator.hostcaps.domcaps import DomCaps
from orchestrator.hostcaps.facts import Check, Firmware, KvmProbe, SnpCaps, Sysfs, TdxCaps
from orchestrator.hostcaps.firmware import FIRMWARE_DIRS, find_firmware, firmware_descriptors
from orchestrator.hostcaps.kvm import (
    KVM_DEVICE,
    KVM_PROBE_TIMEOUT_S,
    cached_kvm_probe,
    fix_kvm_permissions,
    forget_kvm_probe,
    kvm_probe,
    probe_image,
    run_probe_guest,
    tcg_works,
)
from orchestrator.hostcaps.model import HostCaps
from orchestrator.hostcaps.qemu import QEMU_BINARY, qemu_binary_version
from orchestrator.hostcaps.verdicts import FLOORS, TDX_FALSE_POSITIVE, snp_caps, tdx_caps
from orchestrator.hostcaps.versions import (
    Version,
    fmt_version,
    libvirt_number_to_version,
    parse_version,
)

__all__ = [
    "FIRMWARE_DIRS",
    "FLOORS",
    "KVM_DEVICE",
    "KVM_PROBE_TIMEOUT_S",
    "NO_DAEMON_NOTE",
    "QEMU_BINARY",
    "TDX_FALSE_POSITIVE",
    "Check",
    "DomCaps",
    "Firmware",
    "HostCaps",
    "KvmProbe",
    "SnpCaps",
    "Sysfs",
    "TdxCaps",
    "Version",
    "cached_kvm_probe",
    "detect",
    "find_firmware",
    "firmware_descriptors",
    "fix_kvm_permissions",
    "fmt_version",
    "forget_kvm_probe",
    "kvm_probe",
    "libvirt_number_to_version",
    "open_libvirt",
    "parse_version",
    "probe",
    "probe_image",
    "probe_qemu",
    "qemu_binary_version",
    "run_probe_guest",
    "snp_caps",
    "tcg_works",
    "tdx_caps",
]
