"""libvirt's domcapabilities document, parsed into the facts gcvm needs."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from orchestrator.hostcaps.facts import Firmware
from orchestrator.hostcaps.qemu import QEMU_BINARY
from orchestrator.hostcaps.versions import Version


@dataclass(frozen=True)
class DomCaps:
    path: str
    domain: str
    machine: str
    arch: str
    sectypes: tuple[str, ...]
    tdx_feature: bool
    sev_supported: bool
    cbitpos: int | None
    reduced_phys_bits: int | None
    loaders: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> DomCaps:
        try:
            root = ET.fromstring(text)
        except ET.ParseError as exc:
            raise ValueError(f"not XML ({exc})") from None
        if root.tag != "domainCapabilities":
            raise ValueError(f"root element is <{root.tag}>, not <domainCapabilities>")
        sev = root.find("features/sev")
        sev_ok = sev is not None and sev.get("supported") == "yes"
        tdx = root.find("features/tdx")
        return cls(
            path=root.findtext("path", QEMU_BINARY).strip(),
            domain=root.findtext("domain", "").strip(),
            machine=root.findtext("machine", "").strip(),
            arch=root.findtext("arch", "").strip(),
            sectypes=tuple(
                (v.text or "").strip()
                for v in root.findall("features/launchSecurity/enum[@name='sectype']/value")
            )
            if root.find("features/launchSecurity[@supported='yes']") is not None
            else (),
            tdx_feature=tdx is not None and tdx.get("supported") == "yes",
            sev_supported=sev_ok,
            cbitpos=_int_or_none(sev.findtext("cbitpos")) if sev_ok and sev is not None else None,
            reduced_phys_bits=_int_or_none(sev.findtext("reducedPhysBits"))
            if sev_ok and sev is not None
            else None,
            loaders=tuple((v.text or "").strip() for v in root.findall("os/loader/value")),
        )

    def qemu_version_from_machine(self) -> Version | None:
        """`pc-q35-10.1` names the QEMU release that introduced it: a floor for QEMU's version."""
        m = re.search(r"-(\d+)\.(\d+)$", self.machine)
        return (int(m.group(1)), int(m.group(2)), 0) if m else None

    def firmware_guess(self) -> Firmware:
        """Firmware from the loader paths libvirt lists, matched by the names distributions
        give the TDX and AMD SEV builds (a captured file holds no descriptors)."""

        def pick(*needles: str) -> Path | None:
            for value in self.loaders:
                name = Path(value).name.lower()
                if any(n in name for n in needles):
                    return Path(value)
            return None

        return Firmware(tdx=pick("tdx"), sev_snp=pick("amdsev", "sev"), efi=None)


def _int_or_none(text: str | None) -> int | None:
    try:
        return int((text or "").strip())
    except ValueError:
        return None
