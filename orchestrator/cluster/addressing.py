"""`up`'s choice of the cluster's subnet: free where its daemon can see, or the user's, checked."""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
from collections.abc import Iterator
from dataclasses import replace

from orchestrator import paths, privatelibvirt, subnets, ui
from orchestrator.cluster.backend import Backend
from orchestrator.errors import UsageError
from orchestrator.hypervisor import Hypervisor
from orchestrator.spec import ClusterSpec


@contextlib.contextmanager
def allocation_lock() -> Iterator[None]:
    """Host-wide: held from choosing a subnet until the cluster's state records it."""
    folder = paths.state_root() / "clusters"
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".subnets.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def daemon_uri(spec: ClusterSpec) -> str:
    return spec.connect or privatelibvirt.uri_for(privatelibvirt.run_dir_for(spec.name))


def resolve_subnet(spec: ClusterSpec, hv: Hypervisor | None, backend: Backend) -> ClusterSpec:
    """The spec with its subnet settled: the existing --network's own, the user's --subnet once
    it is known to collide with nothing, or a free /24."""
    uri = daemon_uri(spec)
    others = backend.other_clusters(spec.name)
    taken = subnets.cluster_networks(others, spec.name, uri)
    networks: list[tuple[str, str]] = []
    if spec.connect is not None and hv is not None:
        networks = hv.network_subnets()
        taken += backend.host_networks() + subnets.libvirt_networks(networks)
    if spec.network is not None:
        return _in_existing_network(spec, networks)
    if spec.subnet is not None:
        subnets.refuse_collisions(spec.subnet, taken)
        return spec
    # private clusters cannot collide, but stay apart too: a subnet of their own, by choice
    anywhere = subnets.cluster_networks(((n, uri, s) for n, _u, s in others), spec.name, uri)
    chosen = subnets.choose(spec.name, taken + anywhere)
    ui.log.info("subnet %s chosen for cluster %s", chosen, spec.name)
    return replace(spec, subnet=chosen)


def _in_existing_network(spec: ClusterSpec, networks: list[tuple[str, str]]) -> ClusterSpec:
    own = [cidr for name, cidr in networks if name == spec.network]
    if not own:
        raise UsageError(
            f"--network {spec.network}: no such libvirt network at {spec.connect}",
            hint="`virsh net-list --all` lists them; leave out --network for one of its own",
        )
    if spec.subnet is None:
        return replace(spec, subnet=own[0])
    if not ipaddress.IPv4Network(spec.subnet).subnet_of(ipaddress.IPv4Network(own[0])):
        raise UsageError(
            f"--subnet {spec.subnet} is not inside --network {spec.network} ({own[0]})",
            hint="leave out --subnet: the network's own is used",
        )
    return spec
