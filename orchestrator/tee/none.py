"""No TEE: a plain KVM guest where KVM works, TCG (software emulation) where it does not."""

from __future__ import annotations

from pathlib import Path

from orchestrator.hostcaps import HostCaps
from orchestrator.spec import Accel, Tee
from orchestrator.tee.base import (
    TCG_CPU_DISABLED,
    TCG_CPU_MODEL,
    CheckFailure,
    DomainShape,
    TeeBackend,
    TeeOptions,
)


class NoTee(TeeBackend):
    tee = Tee.none
    title = "no TEE"

    def accel_failures(self, caps: HostCaps, accel: Accel) -> list[CheckFailure]:
        if accel is Accel.kvm and not caps.kvm_usable:
            return [
                CheckFailure(
                    "KVM usable",
                    caps.kvm_reason,
                    "use --accel tcg, or leave out --accel (auto falls back to TCG)",
                )
            ]
        if accel is Accel.tcg and not caps.tcg_available:
            return [
                CheckFailure(
                    "TCG available",
                    "this QEMU has no TCG accelerator",
                    "install a QEMU built with TCG",
                )
            ]
        return []

    def shape(
        self, caps: HostCaps, accel: Accel, firmware: Path | None, options: TeeOptions
    ) -> DomainShape:
        kvm = accel is Accel.kvm
        return DomainShape(
            domain_type="kvm" if kvm else "qemu",
            machine="q35",
            cpu_mode="host-passthrough" if kvm else "custom",
            cpu_model=None if kvm else TCG_CPU_MODEL,
            firmware=None,
            loader=None,
            split_irqchip=False,
            smm_off=False,
            private_memory=False,
            on_reboot="restart",
            launch_security=None,
            cpu_disabled=() if kvm else TCG_CPU_DISABLED,
        )
