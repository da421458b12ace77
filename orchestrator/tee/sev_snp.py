"""AMD SEV-SNP: q35, stateless SNP firmware, cbitpos/reducedPhysBits from the host."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from orchestrator.errors import HostUnsupported
from orchestrator.hostcaps import Check, HostCaps
from orchestrator.spec import Accel, Tee
from orchestrator.tee.base import (
    CheckFailure,
    DomainShape,
    TeeBackend,
    TeeOptions,
    kvm_failures,
)


@dataclass(frozen=True)
class SnpLaunch:
    policy: str  # 0x-hex, 8 digits, as libvirt writes it
    cbitpos: int
    reduced_phys_bits: int
    kernel_hashes: bool


class SevSnp(TeeBackend):
    tee = Tee.sev_snp
    title = "AMD SEV-SNP"
    template = "launch_security/sev-snp.xml.j2"

    def host_checks(self, caps: HostCaps) -> tuple[Check, ...]:
        firmware = Check(
            "SEV-SNP firmware (stateless OVMF)",
            caps.firmware.sev_snp is not None,
            str(caps.firmware.sev_snp)
            if caps.firmware.sev_snp
            else "no QEMU firmware descriptor with the amd-sev-snp feature",
            "install the distribution's AMD SEV OVMF build (OVMF.amdsev.fd)",
        )
        return (*caps.snp.checks, firmware)

    def accel_failures(self, caps: HostCaps, accel: Accel) -> list[CheckFailure]:
        return kvm_failures(self.title, caps, accel)

    def shape(
        self, caps: HostCaps, accel: Accel, firmware: Path | None, options: TeeOptions
    ) -> DomainShape:
        if caps.snp.cbitpos is None or caps.snp.reduced_phys_bits is None:
            raise HostUnsupported(
                f"the host capabilities ({caps.source}) hold no SEV cbitpos/reducedPhysBits",
                hint="render SEV-SNP against an SNP host's domcapabilities (--host-caps FILE) "
                "or leave out --host-caps to use the built-in SNP host",
            )
        return DomainShape(
            domain_type="kvm",
            machine="q35",
            cpu_mode="host-passthrough",
            cpu_model=None,
            firmware="efi-stateless",
            loader=firmware or caps.firmware.sev_snp,
            split_irqchip=False,
            smm_off=False,
            private_memory=False,  # libvirt picks the memfd backend SNP needs
            on_reboot="restart",
            launch_security=self.template,
            launch=SnpLaunch(
                policy=f"0x{options.snp_policy:08x}",
                cbitpos=caps.snp.cbitpos,
                reduced_phys_bits=caps.snp.reduced_phys_bits,
                kernel_hashes=options.snp_kernel_hashes,
            ),
        )
