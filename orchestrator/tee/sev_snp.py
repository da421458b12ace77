"""AMD SEV-SNP: q35, stateless SNP firmware, cbitpos/reducedPhysBits from the host."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from orchestrator.errors import HostUnsupported
from orchestrator.hostcaps import Check, HostCaps
from orchestrator.spec import Accel, Tee
from orchestrator.tee.base import (
    ConfidentialBackend,
    DomainShape,
    TeeOptions,
)


@dataclass(frozen=True)
class SnpLaunch:
    policy: str  # 0x-hex, 8 digits, as libvirt writes it
    cbitpos: int
    reduced_phys_bits: int
    kernel_hashes: bool


class SevSnp(ConfidentialBackend):
    tee = Tee.sev_snp
    title = "AMD SEV-SNP"
    template = "launch_security/sev-snp.xml.j2"

    firmware_name = "SEV-SNP firmware (stateless OVMF)"
    firmware_feature = "amd-sev-snp"
    firmware_fix = "install the distribution's AMD SEV OVMF build (OVMF.amdsev.fd)"

    def support_checks(self, caps: HostCaps) -> tuple[Check, ...]:
        return caps.snp.checks

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
            # a reboot would restart the guest in place, outside the launch that the broker
            # attested (and SNP cannot reset an encrypted guest): destroy it, as for a TD
            on_reboot="destroy",
            launch_security=self.template,
            launch=SnpLaunch(
                policy=f"0x{options.snp_policy:08x}",
                cbitpos=caps.snp.cbitpos,
                reduced_phys_bits=caps.snp.reduced_phys_bits,
                kernel_hashes=options.snp_kernel_hashes,
            ),
        )
