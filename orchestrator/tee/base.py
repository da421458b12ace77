"""What every TEE backend provides: its preconditions on the host and the shape of its domain."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from orchestrator.hostcaps import Check, HostCaps
from orchestrator.spec import Accel, Tee

TCG_CPU_MODEL = "Nehalem"  # a baseline model: `-cpu max` makes torch ~27x slower under TCG
# CPU features turned off under TCG. QEMU 7.2's TCG emulates CMPXCHG16B wrongly enough that
# Linux 6.12 double-faults in its slab allocator at boot; without cx16 the kernel falls back to
# a path that works. KVM and TEE guests keep the host's CPU as it is.
TCG_CPU_DISABLED = ("cx16",)


@dataclass(frozen=True)
class CheckFailure:
    check: str
    reason: str
    fix: str = ""

    def __str__(self) -> str:
        return f"{self.check}: {self.reason}" + (f" ({self.fix})" if self.fix else "")


@dataclass(frozen=True)
class DomainShape:
    """Everything about a domain that depends on the TEE and the accelerator."""

    domain_type: str  # libvirt's: kvm | qemu
    machine: str
    cpu_mode: str  # host-passthrough | custom
    cpu_model: str | None  # the model for cpu_mode custom
    firmware: str | None  # None (SeaBIOS + direct boot) | rom | efi-stateless
    loader: Path | None
    split_irqchip: bool
    smm_off: bool  # TDX firmware runs without SMM
    private_memory: bool
    on_reboot: str
    launch_security: str | None  # template of the <launchSecurity> block
    launch: Any = None  # the backend's frozen data for that template
    cpu_disabled: tuple[str, ...] = ()  # features the custom CPU model turns off


class TeeBackend(ABC):
    tee: ClassVar[Tee]
    title: ClassVar[str]
    template: ClassVar[str | None] = None

    def preconditions(self, caps: HostCaps, accel: Accel) -> list[CheckFailure]:
        """What this host lacks to run this TEE with `accel` (empty: it can)."""
        failures = [
            CheckFailure(c.name, c.detail, c.fix) for c in self.host_checks(caps) if c.ok is False
        ]
        return self.accel_failures(caps, accel) + failures

    def host_checks(self, caps: HostCaps) -> tuple[Any, ...]:
        return ()

    @abstractmethod
    def accel_failures(self, caps: HostCaps, accel: Accel) -> list[CheckFailure]: ...

    @abstractmethod
    def shape(
        self, caps: HostCaps, accel: Accel, firmware: Path | None, options: TeeOptions
    ) -> DomainShape: ...


class ConfidentialBackend(TeeBackend):
    """What TDX and SEV-SNP share: the host's own checks plus a firmware built for the TEE, and
    a working KVM."""

    firmware_name: ClassVar[str]  # the check's name, e.g. "TDX firmware (TDVF)"
    firmware_feature: ClassVar[str]  # the feature in QEMU's firmware descriptors
    firmware_fix: ClassVar[str]

    @abstractmethod
    def support_checks(self, caps: HostCaps) -> tuple[Check, ...]:
        """The host's checks for this TEE (sectype, module flag, versions)."""

    def host_checks(self, caps: HostCaps) -> tuple[Check, ...]:
        path = caps.firmware.for_tee(self.tee)
        firmware = Check(
            self.firmware_name,
            path is not None,
            str(path)
            if path
            else f"no QEMU firmware descriptor with the {self.firmware_feature} feature",
            self.firmware_fix,
        )
        return (*self.support_checks(caps), firmware)

    def accel_failures(self, caps: HostCaps, accel: Accel) -> list[CheckFailure]:
        return kvm_failures(self.title, caps, accel)


@dataclass(frozen=True)
class TeeOptions:
    """User-settable launch parameters (defaults as the design note gives them)."""

    tdx_policy: int = 0x10000000  # bit 28 sept-ve-disable; QEMU's default; no debug
    tdx_qgs_socket: Path | None = None  # quote generation service, for attestation quotes
    tdx_mr_config_id: str | None = None  # base64 of 48 bytes the TD's owner binds into MRCONFIGID
    snp_policy: int = 0x00030000  # SMT allowed + reserved bit 17; no debug
    snp_kernel_hashes: bool = True  # measure the direct-boot kernel, initrd and cmdline


def kvm_failures(title: str, caps: HostCaps, accel: Accel) -> list[CheckFailure]:
    """A TEE guest needs a working KVM."""
    out = []
    if accel is Accel.tcg:
        out.append(
            CheckFailure(
                f"{title} accelerator", "a TEE guest cannot run under TCG", "leave out --accel tcg"
            )
        )
    if not caps.kvm_usable:
        out.append(
            CheckFailure(
                "KVM usable",
                caps.kvm_reason,
                "run on a host (not a VM) whose /dev/kvm boots guests",
            )
        )
    return out
