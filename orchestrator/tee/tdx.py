"""Intel TDX: q35, TDVF as ROM, split irqchip, host-passthrough, private memory, no VNC."""

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
class TdxLaunch:
    policy: str  # 0x-hex, as libvirt writes it
    qgs_socket: Path | None
    mr_config_id: str | None = None


class Tdx(ConfidentialBackend):
    tee = Tee.tdx
    title = "Intel TDX"
    template = "launch_security/tdx.xml.j2"

    firmware_name = "TDX firmware (TDVF)"
    firmware_feature = "intel-tdx"
    firmware_fix = "install the distribution's TDX OVMF build (e.g. ovmf with OVMF.inteltdx.fd)"

    def support_checks(self, caps: HostCaps) -> tuple[Check, ...]:
        return caps.tdx.checks

    def shape(
        self, caps: HostCaps, accel: Accel, firmware: Path | None, options: TeeOptions
    ) -> DomainShape:
        loader = firmware or caps.firmware.tdx
        if loader is None:
            raise HostUnsupported(
                "no TDX firmware (TDVF) known for this host",
                hint="render against a TDX host's own domcapabilities, which list its TDVF "
                "(`virsh domcapabilities --machine q35 > FILE`, then --host-caps FILE), or "
                "leave out --host-caps to use the built-in TDX host",
            )
        return DomainShape(
            domain_type="kvm",
            machine="q35",
            cpu_mode="host-passthrough",
            cpu_model=None,
            firmware="rom",
            loader=loader,
            split_irqchip=True,
            smm_off=True,
            private_memory=True,
            on_reboot="destroy",  # a TD reboots by destroy + start
            launch_security=self.template,
            launch=TdxLaunch(
                policy=f"0x{options.tdx_policy:08x}",
                qgs_socket=options.tdx_qgs_socket,
                mr_config_id=options.tdx_mr_config_id,
            ),
        )
