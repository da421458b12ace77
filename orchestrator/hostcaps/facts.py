"""Small value types: one check, a TEE's verdict, the KVM probe's answer, firmware, sysfs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from orchestrator.spec import Tee


@dataclass(frozen=True)
class Check:
    """One fact about the host: ok True/False, or None when it could not be known."""

    name: str
    ok: bool | None
    detail: str
    fix: str = ""


@dataclass(frozen=True)
class TdxCaps:
    supported: bool
    checks: tuple[Check, ...] = ()

    @property
    def reasons(self) -> tuple[str, ...]:
        return tuple(f"{c.name}: {c.detail}" for c in self.checks if c.ok is False)


@dataclass(frozen=True)
class SnpCaps:
    supported: bool
    cbitpos: int | None = None
    reduced_phys_bits: int | None = None
    checks: tuple[Check, ...] = ()

    @property
    def reasons(self) -> tuple[str, ...]:
        return tuple(f"{c.name}: {c.detail}" for c in self.checks if c.ok is False)


@dataclass(frozen=True)
class KvmProbe:
    usable: bool
    reason: str
    cached: bool = False
    seconds: float | None = None


@dataclass(frozen=True)
class Firmware:
    """Firmware images per TEE, from QEMU's firmware descriptors (or a captured file)."""

    tdx: Path | None = None
    sev_snp: Path | None = None
    efi: Path | None = None  # plain UEFI; the no-TEE domain boots the kernel directly instead

    def for_tee(self, tee: Tee) -> Path | None:
        return {Tee.tdx: self.tdx, Tee.sev_snp: self.sev_snp, Tee.none: None}[tee]


@dataclass(frozen=True)
class Sysfs:
    """The kernel's module parameters under `root` (tests point it at a fake tree)."""

    root: Path = Path("/")
    known: tuple[tuple[str, str], ...] | None = None  # (module, param) that are Y; no reading

    def flag(self, module: str, param: str) -> bool | None:
        """True for Y/1, False for N/0; None when the module is not loaded."""
        if self.known is not None:
            return (module, param) in self.known
        path = self.root / "sys" / "module" / module / "parameters" / param
        try:
            value = path.read_text().strip()
        except OSError:
            return None
        return value in ("Y", "y", "1")
