"""QEMU's firmware descriptors (docs/interop/firmware.json): the TDX, SNP and UEFI images."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from orchestrator.hostcaps.facts import Firmware
from orchestrator.ui import log

FIRMWARE_DIRS = (Path("/etc/qemu/firmware"), Path("/usr/share/qemu/firmware"))


def firmware_descriptors(dirs: tuple[Path, ...] = FIRMWARE_DIRS) -> list[dict[str, Any]]:
    """Descriptors in priority order; a file name in an earlier folder hides the same name in a
    later one, and an empty file disables a descriptor (QEMU's rules)."""
    chosen: dict[str, Path] = {}
    for folder in reversed(dirs):
        if folder.is_dir():
            for path in folder.glob("*.json"):
                chosen[path.name] = path
    out = []
    for name in sorted(chosen):
        path = chosen[name]
        try:
            if path.stat().st_size == 0:
                continue
            out.append(json.loads(path.read_text()) | {"_file": str(path)})
        except (OSError, ValueError) as exc:
            log.debug("skipping firmware descriptor %s: %s", path, exc)
    return out


def _descriptor_image(desc: dict[str, Any]) -> Path | None:
    mapping = desc.get("mapping", {})
    if mapping.get("device") == "memory":
        name = mapping.get("filename")
    else:
        name = (mapping.get("executable") or {}).get("filename")
    return Path(name) if name else None


def _for_x86_64(desc: dict[str, Any]) -> bool:
    return any(t.get("architecture") == "x86_64" for t in desc.get("targets", []))


def find_firmware(descriptors: list[dict[str, Any]]) -> Firmware:
    tdx = snp = efi = None
    for desc in descriptors:
        if not _for_x86_64(desc) or "uefi" not in desc.get("interface-types", []):
            continue
        features = set(desc.get("features", []))
        image = _descriptor_image(desc)
        if image is None:
            continue
        if tdx is None and "intel-tdx" in features:
            tdx = image
        if snp is None and "amd-sev-snp" in features:
            snp = image
        if efi is None and not features & {"secure-boot", "intel-tdx", "amd-sev-snp"}:
            efi = image
    return Firmware(tdx=tdx, sev_snp=snp, efi=efi)
