"""`status` (libvirt's view of each VM) and a connection to one guest (`gcvm ssh`)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from orchestrator import state, ui
from orchestrator.cluster.backend import Backend
from orchestrator.errors import (
    HypervisorError,
)
from orchestrator.hostworker import HostWorkerState
from orchestrator.state import ClusterState, VmState


@dataclass(frozen=True)
class VmStatus:
    vm: VmState
    state: str  # libvirt's view: running, shut off, missing, unknown


@dataclass(frozen=True)
class HostWorkerStatus:
    worker: HostWorkerState
    state: str  # running or dead
    uptime_s: float  # since `up` started it (0 when dead)


@dataclass(frozen=True)
class ClusterStatus:
    state: ClusterState
    daemon: str  # running, dead, external
    vms: list[VmStatus]
    host_worker: HostWorkerStatus | None = None


def status(name: str, *, backend: Backend | None = None) -> ClusterStatus:
    backend = backend or Backend()
    st = state.load(name)
    daemon = "external"
    if st.private_daemon is not None:
        daemon = "running" if backend.daemon_alive(st.private_daemon) else "dead"
    states: dict[str, str] = {}
    if daemon != "dead":
        try:
            with contextlib.closing(backend.open_hypervisor(st.uri)) as hv:
                states = {d.name: d.state for d in hv.cluster_domains(name)}
        except HypervisorError as exc:
            ui.warn(str(exc))
    rows = [
        VmStatus(vm, states.get(vm.name, "missing" if daemon != "dead" else "unknown"))
        for vm in st.vms
    ]
    return ClusterStatus(st, daemon, rows, host_worker_status(st, backend))


def host_worker_status(st: ClusterState, backend: Backend) -> HostWorkerStatus | None:
    hw = st.worker_host
    if hw is None:
        return None
    running = backend.host_worker_alive(hw)
    uptime = max(0.0, time.time() - hw.started) if running and hw.started else 0.0
    return HostWorkerStatus(hw, "running" if running else "dead", uptime)


@contextlib.contextmanager
def guest(name: str, node: str, timeout: float = 30.0) -> Iterator[Any]:
    """A connection to one VM of a cluster (for `gcvm ssh NODE CMD`)."""
    from orchestrator.remote import Remote

    st = state.load(name)
    remote = Remote.connect(st, st.vm(node), timeout)
    try:
        yield remote
    finally:
        remote.close()
