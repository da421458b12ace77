"""`gcvm top` and the resources `gcvm run bench` records: readings from libvirt's statistics (the
fake hypervisor here) and /proc (a fake tree, and this process for real), their rates and peaks,
and the tables."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from rich.console import Console

from orchestrator import cluster, state, top
from orchestrator.hypervisor import DomainStats, FakeHypervisor
from orchestrator.spec import ClusterSpec
from tests.unit.test_hostworker import HostBackend


@pytest.fixture
def backend(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> HostBackend:
    monkeypatch.setenv("GCVM_HOME", str(tmp_path / "home"))
    return HostBackend(tmp_path)


def _stat(pid: int, pgid: int, utime: int, stime: int, rss_pages: int, status: str = "S") -> str:
    # pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime
    # cutime cstime priority nice threads itrealvalue starttime vsize rss
    head = f"{pid} (py thon) {status} 1 {pgid} {pgid} 0 -1 0 0 0 0 0 {utime} {stime} 0 0 20 0 1 0"
    return f"{head} 100 4096 {rss_pages} 0\n"


def test_proc_group_usage_sums_the_group(tmp_path: Path) -> None:
    for pid, pgid, ut, st_, rss, status in (
        (10, 10, 100, 50, 256, "S"),
        (11, 10, 200, 0, 512, "R"),
        (12, 99, 999, 999, 999, "S"),
        (13, 10, 5, 5, 5, "Z"),
    ):
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "stat").write_text(_stat(pid, pgid, ut, st_, rss, status))
    (tmp_path / "self").mkdir()
    cpu, rss_mib, count = top.proc_group_usage(10, tmp_path)
    assert count == 2  # the zombie and the other group are not counted
    assert cpu == pytest.approx(350 / top.CLOCK_TICKS)
    assert rss_mib == pytest.approx(768 * top.PAGE_KIB / 1024)


def test_proc_group_usage_of_this_process_is_real() -> None:
    cpu, rss, count = top.proc_group_usage(os.getpgid(0))
    assert count >= 1 and cpu > 0 and rss > 10  # pytest with torch holds far more than 10 MiB


def test_usage_rates_and_peaks() -> None:
    u = top.Usage("vm", "vm", "master", 1)
    for at, cpu, rss in (
        (0.0, 0.0, 100.0),
        (1.0, 0.5, 300.0),
        (2.0, 1.5, 200.0),
        (4.0, 2.0, 250.0),
    ):
        u.add(at, top.Reading("vm", "vm", "master", cpu, rss, 2048.0, 1))
    u.add(5.0, top.Reading("vm", "vm", "master", 9.0, 9999.0, 2048.0, 1, alive=False))  # ignored
    d = u.to_dict()
    assert d["cpu_mean_cores"] == pytest.approx(0.5)  # 2 CPU s over 4 s
    assert d["cpu_peak_cores"] == pytest.approx(1.0)  # between 1 s and 2 s
    assert d["mem_peak_mib"] == 300.0 and d["mem_limit_mib"] == 2048.0
    assert d["cpu_utilisation"] == pytest.approx(0.5) and d["samples"] == 4


def test_read_covers_every_vm_and_the_host_worker(backend: HostBackend) -> None:
    st = cluster.up(ClusterSpec(name="tp", masters=2, workers=0, worker_host=True),
                    backend=backend)  # fmt: skip
    hv = backend.hv
    hv.running.discard("tp-master1")  # a VM that stopped reads as not running
    st = state.ClusterState.from_dict(
        {**st.to_dict(), "host_worker": {**st.host_worker, "pid": os.getpgid(0)}}
    )  # type: ignore[dict-item]
    readings = top.read(st, hv)
    assert list(readings) == ["tp-master0", "tp-master1", "tp-worker-host"]
    m0, m1, hw = readings.values()
    assert m0.alive and m0.kind == "vm" and m0.rss_mib == 1024 and m0.limit_mib == 2048
    assert not m1.alive and m1.cpu_s == 0
    assert hw.kind == "host" and hw.alive and hw.cpu_s > 0  # this process's group, for real

    sampler = top.Sampler(lambda: top.read(st, hv), interval=0.05).start()
    time.sleep(0.3)
    usage = sampler.stop()
    assert usage["tp-master0"]["cpu_mean_cores"] == pytest.approx(1.0, rel=0.3)  # fake: 1 core
    assert usage["tp-master0"]["samples"] >= 3
    assert "tp-master1" in usage and usage["tp-master1"]["samples"] == 0

    console = Console(width=200, record=True)
    console.print(top.usage_table(usage, 2, "Resources"))
    console.print(top.live_table(readings, top.read(st, hv), 1.0, st.name, 2))
    text = console.export_text()
    assert "tp-worker-host" in text and "host process" in text and "not running" in text
    assert "of the host's 2 cores" in text
    cluster.down("tp", backend=backend)


def test_a_reader_that_fails_does_not_stop_the_sampler() -> None:
    calls: list[int] = []

    def reader() -> dict[str, top.Reading]:
        calls.append(1)
        raise RuntimeError("libvirt went away")

    sampler = top.Sampler(reader, interval=0.02).start()
    time.sleep(0.1)
    assert sampler.stop() == {} and len(calls) >= 2 and "went away" in sampler.error


def test_a_second_stop_reads_nothing_more() -> None:
    """A run verb stops the sampler for its results and its session stops it again on the way
    out: the second stop must neither read again nor change the usage already reported."""
    calls: list[int] = []

    def reader() -> dict[str, top.Reading]:
        calls.append(1)
        return {}

    sampler = top.Sampler(reader, interval=0.02).start()
    time.sleep(0.06)
    first = sampler.stop()
    read = len(calls)
    assert sampler.stop() == first and len(calls) == read


def test_fake_hypervisor_statistics_grow() -> None:
    hv = FakeHypervisor()
    hv.running.add("a")
    first = hv.domain_stats()["a"]
    time.sleep(0.02)
    assert isinstance(first, DomainStats) and hv.domain_stats()["a"].cpu_ns > first.cpu_ns


def test_top_once_prints_one_table(backend: HostBackend, capsys: pytest.CaptureFixture) -> None:
    cluster.up(ClusterSpec(name="to", workers=0, worker_host=True), backend=backend)
    top.top("to", once=True, interval=0.1, backend=backend)
    text = capsys.readouterr().out
    assert "to-master0" in text and "to-worker-host" in text and "CPU (cores)" in text
    cluster.down("to", backend=backend)


def test_a_job_that_comes_and_goes_still_counts() -> None:
    """The host worker's job starts after the first reading and exits before the last: its CPU
    counts, and its exit is no negative rate."""

    def reading(parts: dict[int, float]) -> top.Reading:
        return top.Reading("hw", "host", "worker", sum(parts.values()), 100.0, 0.0, 1, True,
                           tuple(sorted(parts.items())))  # fmt: skip

    u = top.Usage("hw", "host", "worker", 1)
    u.add(0.0, reading({1: 0.5}))  # the supervisor alone
    u.add(1.0, reading({1: 0.5, 7: 0.8}))  # the job started: 0.8 s of its own
    u.add(2.0, reading({1: 0.5, 7: 1.8}))
    u.add(3.0, reading({1: 0.6}))  # the job exited
    assert u.busy_s == pytest.approx(0.8 + 1.0 + 0.1)
    assert u.cpu_mean == pytest.approx(1.9 / 3) and u.cpu_peak == pytest.approx(1.0)
