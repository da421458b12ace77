"""Per-pod CPU and memory from the pods' cgroups, against files captured from a real pods
cluster on this host (podman 4.3.1, cgroupfs, cgroup v1): `podman pod inspect`'s CgroupPath and
each pod cgroup's `cpuacct.usage`, `memory.stat` and `memory.limit_in_bytes`, the master pod
running a torch matmul loop (`master0.cpuacct.usage.1s`: the master's usage a second later)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from orchestrator import top
from orchestrator.pods import resources

FIXTURES = Path(__file__).parent / "fixtures" / "pods_cgroups"
PODS = [{"name": "c-master0", "role": "master", "rank": 0},
        {"name": "c-worker0", "role": "worker", "rank": 1}]  # fmt: skip


def _fixture(name: str) -> str:
    return (FIXTURES / name).read_text()


def test_parsers_read_the_captured_files() -> None:
    assert resources.cpu_seconds(_fixture("master0.cpuacct.usage")) == pytest.approx(4.780, 1e-3)
    # the master's matmul loop: ~1.2 cores over the second between the two captures
    busy = (resources.cpu_seconds(_fixture("master0.cpuacct.usage.1s"))
            - resources.cpu_seconds(_fixture("master0.cpuacct.usage")))  # fmt: skip
    assert 0.5 < busy < 2.5
    # the pod's own cgroup has no pages itself: they are its containers' (the total_ lines)
    assert resources.resident_mib(_fixture("master0.memory.stat")) == pytest.approx(
        160530432 / 2**20
    )
    assert 0 < resources.resident_mib(_fixture("worker0.memory.stat")) < 50
    assert resources.limit_mib(_fixture("master0.memory.limit_in_bytes")) == 0.0  # no limit
    assert resources.limit_mib("2147483648\n") == 2048.0


def _tree(root: Path) -> dict[str, str]:
    """The captured files where the kernel has them, under `root`; {pod: cgroup path}."""
    paths = {}
    for pod in PODS:
        short = pod["name"].split("-", 1)[1]
        cgroup = _fixture(f"{short}.cgroup_path").strip()
        paths[pod["name"]] = cgroup
        wanted = {"cpuacct": ["cpuacct.usage"], "memory": ["memory.stat", "memory.limit_in_bytes"]}
        for controller, files in wanted.items():
            folder = root / controller / cgroup.lstrip("/")
            folder.mkdir(parents=True)
            for file_name in files:
                shutil.copy(FIXTURES / f"{short}.{file_name}", folder / file_name)
    return paths


class FakePodman:
    def __init__(self, paths: dict[str, str]) -> None:
        self.paths = paths
        self.calls: list[tuple[str, ...]] = []

    def run(self, *args: str, **_: Any) -> subprocess.CompletedProcess[str]:
        self.calls.append(args)
        names = args[args.index("--format") + 2 :]
        lines = "".join(f"{n} {self.paths[n]}\n" for n in names if n in self.paths)
        return subprocess.CompletedProcess(args, 125 if len(lines.splitlines()) < len(names)
                                           else 0, lines, "")  # fmt: skip


def test_reader_samples_each_pod_from_its_cgroup(tmp_path: Path) -> None:
    paths = _tree(tmp_path)
    podman = FakePodman(paths)
    sampler = top.Sampler(resources.reader(podman, {"pods": PODS}, tmp_path))
    sampler.sample()
    usage_file = tmp_path / "cpuacct" / paths["c-master0"].lstrip("/") / "cpuacct.usage"
    usage_file.write_text(_fixture("master0.cpuacct.usage.1s"))
    sampler.sample()
    usage = sampler.usage()
    assert list(usage) == ["c-master0", "c-worker0"]
    master = usage["c-master0"]
    assert master["kind"] == "pod" and master["role"] == "master" and master["samples"] == 2
    assert master["cpu_mean_cores"] > 0 and master["cpu_peak_cores"] > 0
    assert master["mem_peak_mib"] == pytest.approx(153.1, abs=0.1)
    assert master["mem_limit_mib"] == 0.0
    assert len(podman.calls) == 1  # the cgroups are asked of podman once


def test_a_pod_without_a_cgroup_reads_as_not_running(tmp_path: Path) -> None:
    paths = _tree(tmp_path)
    podman = FakePodman({"c-master0": paths["c-master0"]})  # the worker pod is gone
    readings = resources.reader(podman, {"pods": PODS}, tmp_path)()
    assert readings["c-master0"].alive and readings["c-master0"].rss_mib > 0
    assert not readings["c-worker0"].alive
    assert resources.read_pod("x", "worker", "/libpod_parent/none", tmp_path).alive is False


def test_the_tables_name_pods(tmp_path: Path) -> None:
    from rich.console import Console

    paths = _tree(tmp_path)
    read = resources.reader(FakePodman(paths), {"pods": PODS}, tmp_path)
    console = Console(width=160, record=True)
    first = read()
    console.print(top.live_table(first, read(), 1.0, "c", 2))
    sampler = top.Sampler(lambda: first)
    sampler.sample()
    console.print(top.usage_table(sampler.usage(), 2, "Resources over the run (per pod)"))
    text = console.export_text()
    assert "c-master0" in text and "c-worker0" in text and " pod " in text
