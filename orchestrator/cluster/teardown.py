"""`down`: remove everything a cluster has, or what a crashed `up` left, found by metadata."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import time

from orchestrator import clusterbroker, hostworker, privatelibvirt, state, ui
from orchestrator.cluster.backend import Backend
from orchestrator.cluster.parallel import _parallel
from orchestrator.errors import (
    HypervisorError,
)
from orchestrator.hypervisor import DhcpHost
from orchestrator.spec import check_connect_uri
from orchestrator.state import ClusterState


def down(name: str, *, connect: str | None = None, backend: Backend | None = None) -> bool:
    """Remove everything the cluster has (or a crashed `up` left). False: there was nothing."""
    if connect is not None:
        check_connect_uri(connect)
    backend = backend or Backend()
    with state.locked(name):
        st: ClusterState | None
        try:
            st = state.load(name)
        except state.ClusterNotFound:
            st = None
        except state.StateCorrupt as exc:
            ui.warn(str(exc))
            st = None
        if st is not None:
            ui.attach_debug_log(st.dir / "debug.log")
        started = time.monotonic()
        with ui.step(f"remove cluster {name}"):
            removed = _teardown(name, st, backend, connect=connect)
        if not removed:
            ui.info(f"nothing to remove: no cluster {name!r} and nothing it left behind")
        else:
            ui.info(f"removed {', '.join(removed)} in {time.monotonic() - started:.1f} s")
        return bool(removed)


def _teardown(
    name: str,
    st: ClusterState | None,
    backend: Backend,
    *,
    connect: str | None = None,
) -> list[str]:
    """Remove domains, network or DHCP entries, daemons, namespace, state folder; returns what
    was there. Works from the state file when there is one, else from what it finds."""
    removed: list[str] = []
    ns = st.netns if st is not None else (None if connect else f"gcvm-{name}")
    private = connect is None and (
        st is None or st.private_daemon is not None or st.netns is not None
    )
    uri = (
        st.uri
        if st is not None
        else (connect or privatelibvirt.uri_for(privatelibvirt.run_dir_for(name)))
    )
    control = state.cluster_dir(name) / hostworker.NAME
    if backend.stop_host_worker(st.worker_host if st is not None else None, control):
        removed.append("host worker")
    broker = st.cluster_broker if st is not None else None
    if broker is not None:
        if clusterbroker.stop(broker):
            removed.append("key broker")
        clusterbroker.remove_repository(broker)
    if not private or backend.daemon_leftover(name):
        removed += _remove_from_libvirt(name, st, uri, backend, shared=not private)
    if private:
        if backend.stop_daemon(name):
            removed.append("daemons")
        if ns is not None and backend.netns_exists(ns):
            _kill_all(backend.netns_pids(ns))
            backend.delete_netns(ns)
            removed.append(f"namespace {ns}")
    cdir = state.cluster_dir(name)
    if cdir.exists():
        shutil.rmtree(cdir)
        removed.append(f"{cdir}")
    return removed


def _remove_from_libvirt(
    name: str, st: ClusterState | None, uri: str, backend: Backend, *, shared: bool = False
) -> list[str]:
    """The cluster's domains and network (or DHCP entries). On a private daemon that died, its
    guests die with the namespace: the rest is removed. On a shared daemon (`--connect`) that
    is unreachable, the domains stay defined there: nothing is removed, the state is kept."""
    removed: list[str] = []
    try:
        hv = backend.open_hypervisor(uri)
    except HypervisorError as exc:
        if shared:
            raise HypervisorError(
                f"libvirt at {uri} is unreachable ({exc.message}); nothing was removed",
                hint=f"the cluster's VMs may still be defined there and its state is kept: "
                f"start that daemon, then run `gcvm down --name {name}` again",
            ) from None
        ui.warn(f"libvirt at {uri} is unreachable ({exc}); removing the rest")
        return removed
    with contextlib.closing(hv):
        doms = [d.name for d in hv.cluster_domains(name)]
        gone = _parallel(hv.remove_domain, doms, "remove")
        removed += [f"domain {d}" for d, ok in zip(doms, gone, strict=True) if ok]
        network = st.network if st is not None else f"gcvm-{name}"
        if st is None or st.own_network:
            try:
                if hv.remove_network(network):
                    removed.append(f"network {network}")
            except HypervisorError as exc:
                if shared:
                    raise
                # a private daemon's network goes with the daemon and the namespace, next
                ui.warn(f"{exc.message}; the network goes with the cluster's daemon")
        elif hv.network_exists(network):
            for vm in st.vms:
                hv.remove_dhcp_host(network, DhcpHost(vm.mac, vm.name, vm.address))
            removed.append(f"DHCP entries in {network}")
    return removed


def _kill_all(pids: list[int], timeout: float = 5.0) -> None:
    """SIGKILL what is left in the namespace (guests, dnsmasq) and wait for it to go."""
    own = os.getpid()
    for pid in pids:
        if pid != own:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(
        privatelibvirt.process_name(p) for p in pids if p != own
    ):
        time.sleep(0.05)
