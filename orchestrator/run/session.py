"""The body every run verb shares (`run bench`, `run exec`, `run seed`, `--transport-micro`):
the cluster's lock and state, SSH to its VMs, the run's key broker, the resource sampler, the
ranks, and their cleanup on every way out. A verb is only what differs.

Contract of `RunSession(name)`, a context manager:
- entering takes the cluster's lock (waiting for another gcvm command) and loads its state:
  `st`, `hw` (the host worker or None) and `tee` (the cluster's TEE in the framework's words);
- `connect(names)` opens SSH to those VMs (`remotes`); `start_broker(...)` gives the run's keys
  to a key broker: the run's own, or the cluster's (`up --broker`); `sample()` opens the resource
  sampler (the verb starts and stops it); `start(node, ...)` starts a rank on its VM or as the host
  worker; `watch(timeout)` waits for every rank (a failed one stops the others);
- leaving: on an exception (a failed start, a lost connection, Ctrl-C) the ranks still running
  are killed first; then, on every path, the broker is stopped, the sampler stopped, the libvirt
  and SSH connections closed and the lock released, each even when one before it fails. The
  exception itself goes on.
"""

from __future__ import annotations

import shlex
import time
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from types import TracebackType
from typing import Any

from orchestrator import ownerid, packages, runbroker, state, top
from orchestrator.agentclient import LockedGuest
from orchestrator.cluster import Backend
from orchestrator.errors import HypervisorError
from orchestrator.hostworker import HostWorkerState
from orchestrator.remote import Remote
from orchestrator.run.deploy import Broker, broker_step
from orchestrator.run.ranks import Ranks
from orchestrator.run.world import Node, framework_tee
from orchestrator.spec import Role
from orchestrator.ui import console, step


def connect_all(st: state.ClusterState, names: Sequence[str] | None = None) -> dict[str, Any]:
    """SSH to every VM of the cluster (or those named); the host worker needs none. A locked
    master gets its job agent instead (`LockedGuest`: package files, a `launch` job, results)."""
    remotes: dict[str, Any] = {}
    try:
        for vm in st.vms:
            if names is not None and vm.name not in names:
                continue
            if vm.locked:
                remotes[vm.name] = LockedGuest(vm.name, vm.address, st.netns)
                continue
            remotes[vm.name] = Remote.connect(st, vm, timeout=30)
    except BaseException:
        for r in remotes.values():
            r.close()
        raise
    return remotes


def open_sampler(st: state.ClusterState) -> tuple[top.Sampler, Any]:
    """A sampler of every VM (libvirt) and the host worker (/proc) over the run."""
    hv = None
    try:
        hv = Backend().open_hypervisor(st.uri)
    except HypervisorError as exc:
        console.print(f"[yellow]warning:[/] no VM statistics: {exc.message}")
    return top.Sampler(lambda: top.read(st, hv)), hv


class RunSession:
    """One run of a verb on cluster `name` (see the module's docstring for the contract)."""

    st: state.ClusterState

    def __init__(self, name: str) -> None:
        self.name = name
        self.ranks = Ranks()
        self.remotes: dict[str, Any] = {}  # Remote, or LockedGuest for a locked master
        self.broker: Broker | None = None
        self.sampler: top.Sampler | None = None
        self._hv: Any = None
        self._cleanup = ExitStack()

    def __enter__(self) -> RunSession:
        with ExitStack() as stack:
            stack.enter_context(state.locked(self.name))
            # undone last to first: broker, sampler, libvirt, SSH, then the lock
            stack.callback(self._close_remotes)
            stack.callback(self._close_hypervisor)
            stack.callback(self._stop_sampler)
            stack.callback(self._stop_broker)
            self.st = state.load(self.name)
            self._cleanup = stack.pop_all()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:  # fmt: skip
        try:
            if exc_type is not None:  # a failed start, a lost connection, Ctrl-C: stop what runs
                self.ranks.kill_all()
        finally:
            self._cleanup.__exit__(exc_type, exc, tb)

    @property
    def hw(self) -> HostWorkerState | None:
        return self.st.worker_host

    @property
    def tee(self) -> str:
        return framework_tee(self.st)

    def check_policy(self, policy: str | None) -> None:
        """A run's own broker needs a policy on a TEE cluster (the cluster's has its own)."""
        if self.st.cluster_broker is None:
            runbroker.check_policy(self.tee, Path(policy) if policy else None)

    def connect(self, names: Sequence[str] | None = None) -> dict[str, Any]:
        self.remotes.update(connect_all(self.st, names))
        return self.remotes

    def start_broker(self, pkgs: Sequence[packages.HostPackage], policy: str | None,
                     owner: Path, announce: bool = False) -> Broker:  # fmt: skip
        """The run's keys to a broker (stopped with the session); `announce`: say where it
        listens and what it runs."""
        identity = owner / ownerid.BROKER_DIR if self.st.trust else None
        self.broker = runbroker.broker_for(self.st, packages.broker_resources(pkgs), self.tee,
                                          Path(policy) if policy else None,
                                          owner / "broker.log", identity)  # fmt: skip
        broker = self.broker
        with step(broker_step(self.st)):
            broker.start()
        if announce:
            console.print(f"broker: {broker.url} in namespace {self.st.netns or '(host)'} "
                          f"(as `{shlex.join(broker.argv())}`)")  # fmt: skip
        if broker.insecure:
            console.print(f"[yellow]warning:[/] --tee none: {packages.INSECURE_LABEL}")
        return broker

    def sample(self) -> top.Sampler:
        """The resource sampler over the run (not started yet)."""
        self.sampler, self._hv = open_sampler(self.st)
        return self.sampler

    def start(self, node: Node, role: Role, argv: Sequence[str], env: dict[str, str],
              host_env: dict[str, str]) -> None:  # fmt: skip
        """A rank on its VM (with `env`) or as the host worker (with `host_env`)."""
        if node.host:
            hw = self.st.worker_host
            assert hw is not None
            self.ranks.start_on_host(hw, role, argv, host_env)
        else:
            self.ranks.start(self.remotes[node.name], node.name, role, argv, env)

    def watch(self, timeout: float) -> dict[str, int]:
        return self.ranks.watch(time.monotonic() + timeout)

    def _stop_broker(self) -> None:
        if self.broker is not None:
            self.broker.stop()

    def _stop_sampler(self) -> None:
        if self.sampler is not None:
            self.sampler.stop()

    def _close_hypervisor(self) -> None:
        if self._hv is not None:
            self._hv.close()

    def _close_remotes(self) -> None:
        for r in self.remotes.values():
            r.close()
