"""HostCaps: everything known about the host, from any source."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from orchestrator.errors import UsageError
from orchestrator.hostcaps.domcaps import DomCaps
from orchestrator.hostcaps.facts import Firmware, KvmProbe, SnpCaps, Sysfs, TdxCaps
from orchestrator.hostcaps.verdicts import snp_caps, tdx_caps
from orchestrator.hostcaps.versions import Version
from orchestrator.spec import Tee


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
