"""`gcvm top`, and what `gcvm run bench` records of it: each VM's, the host worker's or each
pod's CPU and memory.

VMs come from libvirt's domain statistics (`cpu.time`, the QEMU process's `balloon.rss`); the
host worker from /proc, summed over its process group (the supervisor and the rank it runs); a
pod from its cgroup (`orchestrator.pods.resources`).
CPU is given in cores (1.00 = one core busy all the time), memory as resident MiB. A `Sampler`
takes a reading every interval in a thread of its own; rates come from consecutive readings.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.hypervisor import DomainStats, Hypervisor
from orchestrator.state import ClusterState

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
KINDS = {"vm": "VM", "host": "host process", "pod": "pod"}
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024


@dataclass(frozen=True)
class Reading:
    """One node at one instant: cumulative CPU seconds, resident memory."""

    name: str
    kind: str  # vm, host or pod
    role: str
    cpu_s: float
    rss_mib: float
    limit_mib: float  # memory given (VMs) or 0
    cpus: int  # vCPUs, or the host worker's threads
    alive: bool = True
    # the host worker's processes come and go (a job per run): CPU seconds per pid, so a rate
    # is the sum of each process's own increase, never the drop of one that exited
    parts: tuple[tuple[int, float], ...] = ()


def proc_group_usage(pgid: int, proc: Path = Path("/proc")) -> tuple[float, float, int]:
    """(CPU seconds, resident MiB, processes) of every process in group `pgid`."""
    per_pid, rss = proc_group_parts(pgid, proc)
    return sum(per_pid.values()), rss, len(per_pid)


def proc_group_parts(pgid: int, proc: Path = Path("/proc")) -> tuple[dict[int, float], float]:
    """({pid: CPU seconds}, resident MiB) of every live process in group `pgid`."""
    from orchestrator.hostworker import group_stats

    per_pid: dict[int, float] = {}
    rss_pages = 0
    for pid, fields_ in group_stats(pgid, proc):
        # after the command: state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt
        # utime stime cutime cstime priority nice threads itrealvalue starttime vsize rss
        if len(fields_) < 22:
            continue
        per_pid[pid] = (int(fields_[11]) + int(fields_[12])) / CLOCK_TICKS
        rss_pages += int(fields_[21])
    return per_pid, rss_pages * PAGE_KIB / 1024


def read(st: ClusterState, hv: Hypervisor | None,
         proc: Path = Path("/proc")) -> dict[str, Reading]:  # fmt: skip
    """One reading of every VM of the cluster and of its host worker."""
    stats: dict[str, DomainStats] = {}
    if hv is not None:
        with contextlib.suppress(Exception):  # a daemon that is gone: VMs read as not running
            stats = hv.domain_stats()
    out: dict[str, Reading] = {}
    for vm in sorted(st.vms, key=lambda v: v.rank):
        s = stats.get(vm.name)
        out[vm.name] = Reading(
            vm.name, "vm", vm.role,
            cpu_s=s.cpu_ns / 1e9 if s else 0.0,
            rss_mib=s.rss_kib / 1024 if s else 0.0,
            limit_mib=(s.memory_kib / 1024 if s and s.memory_kib else float(vm.memory_mib)),
            cpus=(s.vcpus or vm.vcpus) if s else vm.vcpus,
            alive=s is not None,
        )  # fmt: skip
    hw = st.worker_host
    if hw is not None:
        from orchestrator import hostworker

        parts: dict[int, float] = {}
        rss = 0.0
        groups = [hw.pid, *hostworker.live_jobs(Path(hw.dir))] if hw.pid else []
        for pgid in groups:  # the supervisor's group and the job's own
            per_pid, r = proc_group_parts(pgid, proc)
            parts.update(per_pid)
            rss += r
        out[hw.name] = Reading(hw.name, "host", "worker", sum(parts.values()), rss, 0.0,
                               hw.threads, bool(parts), tuple(sorted(parts.items())))  # fmt: skip
    return out


def _increase(before: Reading, after: Reading) -> float:
    """CPU seconds spent between two readings of one node."""
    if not after.parts and not before.parts:
        return max(0.0, after.cpu_s - before.cpu_s)
    earlier = dict(before.parts)
    # a process that was not there before started since: all its time is new
    return sum(max(0.0, cpu - earlier.get(pid, 0.0)) for pid, cpu in after.parts)


@dataclass
class Usage:
    """What one node did over a run: CPU in cores (mean and peak of the intervals), peak RSS."""

    name: str
    kind: str
    role: str
    cpus: int
    cpu_mean: float = 0.0
    cpu_peak: float = 0.0
    mem_peak_mib: float = 0.0
    limit_mib: float = 0.0
    samples: int = 0
    busy_s: float = 0.0  # CPU seconds spent between the first reading and the last
    _first_at: float | None = None
    _last: Reading | None = None
    _last_at: float = 0.0

    def add(self, at: float, r: Reading) -> None:
        if not r.alive:
            return
        self.mem_peak_mib = max(self.mem_peak_mib, r.rss_mib)
        self.limit_mib = r.limit_mib
        if self._last is not None and at > self._last_at:
            spent = _increase(self._last, r)
            self.busy_s += spent
            self.cpu_peak = max(self.cpu_peak, spent / (at - self._last_at))
        if self._first_at is None:
            self._first_at = at
        self._last, self._last_at = r, at
        self.samples += 1
        span = at - self._first_at
        if span > 0:
            self.cpu_mean = self.busy_s / span

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind, "role": self.role, "cpus": self.cpus,
            "cpu_mean_cores": round(self.cpu_mean, 3), "cpu_peak_cores": round(self.cpu_peak, 3),
            "cpu_utilisation": round(self.cpu_mean / max(self.cpus, 1), 3),
            "mem_peak_mib": round(self.mem_peak_mib, 1), "mem_limit_mib": round(self.limit_mib, 1),
            "samples": self.samples,
        }  # fmt: skip


@dataclass
class Sampler:
    """Readings every `interval` seconds in a thread until `stop()`; `usage()` sums them up."""

    reader: Callable[[], dict[str, Reading]]
    interval: float = 1.0
    usages: dict[str, Usage] = field(default_factory=dict)
    host_cpus: int = field(default_factory=lambda: os.cpu_count() or 1)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    error: str = ""

    def sample(self) -> None:
        at = time.monotonic()
        for name, r in self.reader().items():
            usage = self.usages.setdefault(name, Usage(name, r.kind, r.role, r.cpus))
            usage.add(at, r)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.sample()
            except Exception as exc:  # a reading must never break the run it watches
                self.error = str(exc)
            self._stop.wait(self.interval)

    def start(self) -> Sampler:
        self._thread = threading.Thread(target=self._loop, name="gcvm-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> dict[str, dict[str, Any]]:
        """Ends the readings with a last one and sums them up; stopping again (a run verb stops
        it for its results, its session once more on the way out) reads nothing more."""
        if self._stop.is_set():
            return self.usage()
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.interval + 5)
        with contextlib.suppress(Exception):
            self.sample()  # the last interval
        return self.usage()

    def usage(self) -> dict[str, dict[str, Any]]:
        return {name: u.to_dict() for name, u in self.usages.items()}


def usage_table(usage: dict[str, dict[str, Any]], host_cpus: int, title: str) -> Any:
    """The resources a run used, per VM and for the host worker (rich Table)."""
    from rich.table import Table

    t = Table(title=title, title_justify="left")
    for column, justify in (("node", "left"), ("kind", "left"), ("role", "left"),
                            ("cpus", "right"), ("CPU mean (cores)", "right"),
                            ("CPU peak", "right"), ("of its cpus", "right"),
                            ("peak MiB", "right"), ("given MiB", "right")):  # fmt: skip
        t.add_column(column, justify=justify)  # type: ignore[arg-type]
    total = 0.0
    for name, u in usage.items():
        total += u["cpu_mean_cores"]
        t.add_row(
            name, KINDS.get(u["kind"], u["kind"]), u["role"], str(u["cpus"]),
            f"{u['cpu_mean_cores']:.2f}", f"{u['cpu_peak_cores']:.2f}",
            f"{u['cpu_utilisation']:.0%}", f"{u['mem_peak_mib']:.0f}",
            f"{u['mem_limit_mib']:.0f}" if u["mem_limit_mib"] else "-",
        )  # fmt: skip
    t.caption = f"together {total:.2f} of the host's {host_cpus} cores" + (
        " (saturated: the run is CPU-bound on this host)" if total >= 0.9 * host_cpus else ""
    )
    return t


def live_table(previous: dict[str, Reading], current: dict[str, Reading], span: float,
               name: str, host_cpus: int) -> Any:  # fmt: skip
    """`gcvm top`'s table from two readings `span` seconds apart."""
    from rich.table import Table

    t = Table(title=f"cluster {name}: CPU and memory ({span:.1f} s interval)",
              title_justify="left")  # fmt: skip
    for column, justify in (("node", "left"), ("kind", "left"), ("role", "left"),
                            ("state", "left"), ("cpus", "right"), ("CPU (cores)", "right"),
                            ("of its cpus", "right"), ("RSS MiB", "right"),
                            ("given MiB", "right")):  # fmt: skip
        t.add_column(column, justify=justify)  # type: ignore[arg-type]
    total = 0.0
    for name, r in current.items():
        before = previous.get(name)
        rate = _increase(before, r) / span if before and span > 0 and r.alive else 0.0
        rate = max(rate, 0.0)
        total += rate
        t.add_row(
            name, KINDS.get(r.kind, r.kind), r.role,
            "running" if r.alive else "not running", str(r.cpus), f"{rate:.2f}",
            f"{rate / max(r.cpus, 1):.0%}", f"{r.rss_mib:.0f}" if r.alive else "-",
            f"{r.limit_mib:.0f}" if r.limit_mib else "-",
        )  # fmt: skip
    load = os.getloadavg()[0]
    t.caption = f"together {total:.2f} of the host's {host_cpus} cores; load average {load:.2f}"
    return t


def top(name: str, *, once: bool, interval: float, backend: Any = None) -> None:
    """`gcvm top` of a VM cluster: a live table until Ctrl-C, or one sample (`--once`). (A
    pods cluster's pods come from their cgroups: `orchestrator.pods.resources.top`.)"""
    from orchestrator import state
    from orchestrator.cluster import Backend
    from orchestrator.errors import HypervisorError
    from orchestrator.ui import warn

    st = state.load(name)
    backend = backend or Backend()
    hv: Hypervisor | None = None
    try:
        hv = backend.open_hypervisor(st.uri)
    except HypervisorError as exc:
        warn(f"libvirt unreachable ({exc.message}): VMs show as not running")
    try:
        watch(name, lambda: read(st, hv), once=once, interval=interval)
    finally:
        if hv is not None:
            hv.close()


def watch(name: str, reader: Callable[[], dict[str, Reading]], *, once: bool,
          interval: float) -> None:  # fmt: skip
    """`gcvm top`'s table from `reader`'s readings every `interval` s (one with `once`)."""
    from orchestrator.ui import out

    host_cpus = os.cpu_count() or 1
    previous, began = reader(), time.monotonic()
    if once:
        time.sleep(interval)
        current = reader()
        out.print(live_table(previous, current, time.monotonic() - began, name, host_cpus))
        return
    from rich.live import Live

    with Live(auto_refresh=False, console=out) as live:
        while True:
            time.sleep(interval)
            current, now = reader(), time.monotonic()
            live.update(live_table(previous, current, now - began, name, host_cpus),
                        refresh=True)  # fmt: skip
            previous, began = current, now
