"""Host caps through a libvirt connection, and which source `doctor`/`render` use."""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from dataclasses import replace
from typing import Any
from urllib.parse import urlparse

from orchestrator.errors import HostUnsupported
from orchestrator.hostcaps.direct import probe_qemu
from orchestrator.hostcaps.domcaps import DomCaps
from orchestrator.hostcaps.facts import Firmware, KvmProbe, Sysfs
from orchestrator.hostcaps.firmware import find_firmware, firmware_descriptors
from orchestrator.hostcaps.kvm import KVM_DEVICE, _kvm_answer
from orchestrator.hostcaps.model import HostCaps
from orchestrator.hostcaps.versions import libvirt_number_to_version
from orchestrator.spec import check_connect_uri


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
        conn = open_libvirt(check_connect_uri(connect))
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
