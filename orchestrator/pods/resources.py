"""Each pod's CPU and memory, for `gcvm top` and `gcvm run bench` on a pods cluster.

Read from the pod's cgroup: podman here runs with the cgroupfs manager (gcvm's private
configuration), so every pod has a cgroup of its own, `podman pod inspect`'s `CgroupPath`
(`/libpod_parent/<pod id>`), holding the pod's containers (the rank's, and the infra container)
and their conmon. This host's cgroups are v1 (hybrid): CPU is `cpuacct.usage` (nanoseconds, the
whole subtree, processes that exited included, so a rank started with `podman exec` that ends
between two readings still counts), memory is `memory.stat`'s `total_rss + total_mapped_file`
(anonymous memory and mapped files charged to the pod, the subtree; library pages another cgroup
read first are charged there, so a pod reads lower than the `ps` RSS of its processes). A pod
has no CPU limit here: its cpus are the host's.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from orchestrator.top import Reading

CGROUP_ROOT = Path("/sys/fs/cgroup")
NO_LIMIT = 1 << 62  # memory.limit_in_bytes of an unlimited cgroup is close to 2**63


def cpu_seconds(cpuacct_usage: str) -> float:
    """`cpuacct.usage` (cumulative nanoseconds) in seconds."""
    return int(cpuacct_usage.strip()) / 1e9


def resident_mib(memory_stat: str) -> float:
    """Resident MiB from a v1 `memory.stat`: anonymous plus mapped file pages, the subtree."""
    fields = dict(line.split(" ", 1) for line in memory_stat.splitlines() if " " in line)
    return (int(fields.get("total_rss", 0)) + int(fields.get("total_mapped_file", 0))) / 2**20


def limit_mib(limit_in_bytes: str) -> float:
    """`memory.limit_in_bytes` in MiB; 0 for no limit."""
    value = int(limit_in_bytes.strip())
    return 0.0 if value >= NO_LIMIT else value / 2**20


def cgroup_paths(podman: Any, pods: list[dict[str, Any]]) -> dict[str, str]:
    """Each pod's cgroup (relative to a hierarchy's root), as podman recorded it."""
    names = [pod["name"] for pod in pods]
    if not names:
        return {}
    proc = podman.run("pod", "inspect", "--format", "{{.Name}} {{.CgroupPath}}", *names,
                      check=False, timeout=30)  # fmt: skip
    paths = dict(line.split(" ", 1) for line in proc.stdout.splitlines() if " " in line)
    return {name: path.strip() for name, path in paths.items() if path.strip().startswith("/")}


def read_pod(name: str, role: str, cgroup: str | None, root: Path = CGROUP_ROOT,
             cpus: int | None = None) -> Reading:  # fmt: skip
    """One reading of one pod; a pod whose cgroup is gone (or was never found) reads as not
    running."""
    cpus = cpus or os.cpu_count() or 1
    if cgroup:
        rel = cgroup.lstrip("/")
        try:
            cpu = cpu_seconds((root / "cpuacct" / rel / "cpuacct.usage").read_text())
            memory = root / "memory" / rel
            rss = resident_mib((memory / "memory.stat").read_text())
            limit = limit_mib((memory / "memory.limit_in_bytes").read_text())
            return Reading(name, "pod", role, cpu, rss, limit, cpus)
        except (OSError, ValueError):
            pass
    return Reading(name, "pod", role, 0.0, 0.0, 0.0, cpus, alive=False)


def reader(podman: Any, record: Mapping[str, Any], root: Path = CGROUP_ROOT) -> Any:
    """A function giving one reading of every pod of the cluster (for `top.Sampler`); the
    cgroups are asked of podman once, and again for a pod not found yet."""
    pods = sorted(record.get("pods", []), key=lambda p: p["rank"])
    paths: dict[str, str] = {}

    def read() -> dict[str, Reading]:
        if any(pod["name"] not in paths for pod in pods):
            paths.update(cgroup_paths(podman, pods))
        return {pod["name"]: read_pod(pod["name"], pod["role"], paths.get(pod["name"]), root)
                for pod in pods}  # fmt: skip

    return read


def top(name: str, *, once: bool, interval: float) -> None:
    """`gcvm top` of a pods cluster: its pods from their cgroups."""
    from orchestrator.pods import lifecycle
    from orchestrator.top import watch

    record = lifecycle.load(name)
    watch(name, reader(lifecycle.podman_for(name, record), record), once=once, interval=interval)
