"""`gcvm doctor`: the host facts gcvm depends on, what to do about each, and a verdict per TEE.

Where the facts come from: `--connect URI` if given; else `qemu:///system` when a libvirt daemon
answers; else QEMU itself (`-accel help`, `-object help`, `-machine help`, `--version`) plus
libvirt's library version, reported as "libvirt daemon not running (gcvm up starts a private
one)". Doctor starts no daemon. As root it makes /dev/kvm root:kvm 0660 when it is not (without
udev it is root:root 0600, and every libvirt call then takes about 45 s) and says so.

Exit status: 0 when at least the no-TEE fallback (KVM or TCG) can run; with `--tee T`, 0 when T
can run, else 2 with every failed check named.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Annotated

import typer
from rich.table import Table

from orchestrator import doctor_guest, hostcaps, tee
from orchestrator.errors import HostUnsupported
from orchestrator.hostcaps import Check, HostCaps, fmt_version
from orchestrator.spec import Accel, ClusterSpec, Tee
from orchestrator.tee import CheckFailure
from orchestrator.ui import out

MARK = {True: "[green]ok[/]", False: "[red]no[/]", None: "[yellow]?[/]"}


@dataclass(frozen=True)
class Verdict:
    tee: Tee
    ok: bool
    accel: Accel | None
    failures: tuple[CheckFailure, ...]

    @property
    def summary(self) -> str:
        if not self.ok:
            return "cannot run"
        if self.accel is Accel.tcg:
            return "ready (TCG: software emulation, slower)"
        return f"ready ({(self.accel or Accel.kvm).value.upper()})"


def verdict(caps: HostCaps, tee_: Tee) -> Verdict:
    spec = ClusterSpec(tee=tee_)
    try:
        accel = tee.require(spec, caps)
    except HostUnsupported:
        accel = tee.resolve_accel(Accel.auto, caps) if tee_ is Tee.none else Accel.kvm
        failures = tee.backend(tee_).preconditions(caps, accel)
        return Verdict(tee_, False, None, tuple(failures))
    return Verdict(tee_, True, accel, ())


def facts(caps: HostCaps, kvm_fix: str | None, tcg: hostcaps.KvmProbe | None) -> list[Check]:
    """The rows of the facts table, in reading order."""
    libvirt_fix = (
        "gcvm up starts a private libvirtd; nothing to do" if not caps.libvirt_daemon else ""
    )
    rows = [
        Check("facts from", True, caps.source),
        Check(
            "libvirt",
            None if not caps.libvirt_daemon else True,
            f"{fmt_version(caps.libvirt_version)}"
            + ("" if caps.libvirt_daemon else f"; {hostcaps.NO_DAEMON_NOTE}"),
            libvirt_fix,
        ),
        Check(
            "QEMU",
            caps.qemu_version is not None,
            f"{fmt_version(caps.qemu_version)} ({caps.emulator})",
            "scripts/install-system-deps.sh installs QEMU",
        ),
        Check("host kernel", True, caps.kernel_release or "unknown"),
        Check(
            "machine q35",
            any("q35" in m for m in caps.machines) or not caps.machines,
            ", ".join(m for m in caps.machines if m in ("q35", "pc", "microvm"))
            or ", ".join(caps.machines[:3])
            or "unknown",
            "install a QEMU with the q35 machine",
        ),
        Check(
            "/dev/kvm permissions",
            True,
            f"fixed: {kvm_fix}" if kvm_fix else "root:kvm 0660 or not applicable",
            "",
        ),
        Check(
            "KVM present",
            caps.kvm_present,
            "/dev/kvm exists" if caps.kvm_present else "no /dev/kvm",
            "load kvm_intel/kvm_amd, or enable nested virtualisation for this VM",
        ),
        Check(
            "KVM usable",
            caps.kvm_usable,
            caps.kvm_reason + (" (cached answer)" if caps.kvm_cached else ""),
            ""
            if caps.kvm_usable
            else "gcvm falls back to TCG (--accel auto); `gcvm doctor --reprobe` probes again",
        ),
        Check(
            "TCG available",
            caps.tcg_available if tcg is None else tcg.usable,
            "software emulation" + (f": {tcg.reason}" if tcg else ""),
            "install a QEMU built with TCG",
        ),
    ]
    rows += [
        Check(f"TDX: {c.name}", c.ok, c.detail, c.fix if c.ok is False else "")
        for c in tee.backend(Tee.tdx).host_checks(caps)
    ]
    rows += [
        Check(f"SEV-SNP: {c.name}", c.ok, c.detail, c.fix if c.ok is False else "")
        for c in tee.backend(Tee.sev_snp).host_checks(caps)
    ]
    rows.append(
        Check(
            "UEFI firmware",
            caps.firmware.efi is not None,
            str(caps.firmware.efi or "none (not needed: direct kernel boot)"),
            "",
        )
    )
    for note in caps.notes:
        if note != hostcaps.NO_DAEMON_NOTE:
            rows.append(Check("note", None, note))
    return rows


def facts_table(rows: list[Check], title: str = "gcvm doctor: host facts") -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column("fact", no_wrap=True)
    table.add_column("", no_wrap=True)
    table.add_column("value")
    table.add_column("what to do")
    for row in rows:
        table.add_row(row.name, MARK[row.ok], row.detail, row.fix)
    return table


def verdict_table(verdicts: list[Verdict]) -> Table:
    table = Table(title="verdict per TEE", title_justify="left")
    table.add_column("--tee", no_wrap=True)
    table.add_column("verdict", no_wrap=True)
    table.add_column("why / what to do")
    for v in verdicts:
        why = "\n".join(f"{f.check}: {f.reason}" for f in v.failures) or "-"
        colour = "green" if v.ok else "red"
        table.add_row(v.tee.value, f"[{colour}]{v.summary}[/]", why)
    return table


def run(connect: str | None, tee_: Tee | None, reprobe: bool) -> None:
    kvm_fix = hostcaps.fix_kvm_permissions()
    if reprobe:
        hostcaps.forget_kvm_probe()
    caps = hostcaps.detect(connect)
    tcg = hostcaps.tcg_works(caps.emulator) if caps.tcg_available else None
    if tcg is not None and not tcg.usable:
        caps = replace(caps, tcg_available=False)
    out.print(facts_table(facts(caps, kvm_fix, tcg)))
    out.print(facts_table(doctor_guest.guest_checks(), "gcvm doctor: guest side"))
    verdicts = [verdict(caps, t) for t in Tee]
    out.print(verdict_table(verdicts))
    if tee_ is not None:
        tee.require(ClusterSpec(tee=tee_), caps)  # raises, naming each failed check
    elif not verdicts[0].ok:
        raise HostUnsupported(
            "this host can run no VM: neither KVM nor TCG works",
            hint="install qemu-system-x86 (scripts/install-system-deps.sh)",
        )


def doctor_command(
    connect: Annotated[
        str | None,
        typer.Option(
            "--connect",
            help="libvirt URI to ask (default: qemu:///system if a daemon runs, else "
            "QEMU directly).",
        ),
    ] = None,
    tee_: Annotated[
        Tee | None,
        typer.Option(
            "--tee",
            help="Exit 2 unless this TEE can run here (default: exit 0 when the no-TEE "
            "fallback can run).",
        ),
    ] = None,
    reprobe: Annotated[
        bool, typer.Option("--reprobe", help="Forget the cached KVM probe answer and probe again.")
    ] = False,
) -> None:
    """Show the host facts gcvm depends on (KVM, TCG, TDX, SEV-SNP, firmware, versions),
    what to do about each, and a verdict per TEE.

    Facts come from --connect URI, else qemu:///system when a libvirt daemon runs, else QEMU
    itself ("libvirt daemon not running": gcvm up starts a private one). Doctor starts nothing.
    """
    run(connect, tee_, reprobe)
