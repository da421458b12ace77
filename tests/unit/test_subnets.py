"""Unique per cluster: a free subnet chosen per cluster (against routes, bridges, libvirt networks
and the other clusters on the daemon), MACs that carry the cluster, and an explicit --subnet that
collides refused naming what it collides with. The host and libvirt are fakes."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator import cluster, render, subnets
from orchestrator.errors import UsageError
from orchestrator.spec import ClusterSpec, plan_vms
from orchestrator.subnets import Taken
from tests.unit.test_cluster import FakeBackend

SHARED = "qemu:///system"


@pytest.fixture
def backend(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeBackend]:
    monkeypatch.setenv("GCVM_HOME", str(tmp_path / "home"))
    yield FakeBackend(tmp_path)


def _default_network(backend: FakeBackend, name: str, subnet: str) -> None:
    """A network that is not gcvm's, like a system libvirt's `default`."""
    xml = render.render_network(ClusterSpec(name="x", subnet=subnet), [], bridge="virbr0")
    backend.hv.define_network(xml.replace("gcvm-x", name))


def test_preferred_subnet_is_a_deterministic_slot_of_the_pool() -> None:
    a = subnets.preferred_subnet("alpha")
    assert a == subnets.preferred_subnet("alpha")
    assert ipaddress.IPv4Network(a).subnet_of(subnets.POOL) and a.endswith("/24")
    assert len({subnets.preferred_subnet(f"c{i}") for i in range(40)}) > 30  # spread


def test_choose_skips_what_is_taken() -> None:
    first = ipaddress.IPv4Network(subnets.preferred_subnet("alpha"))
    taken = [Taken(first, "route x"), Taken(ipaddress.IPv4Network("192.168.0.0/16"), "vpn")]
    with pytest.raises(UsageError, match="no free /24"):
        subnets.choose("alpha", taken)
    assert subnets.choose("alpha", taken[:1]) != str(first)


def test_routes_and_addresses_parsed_from_ip_json() -> None:
    routes = [
        {"dst": "default", "gateway": "10.0.0.1", "dev": "eth0"},
        {"dst": "10.0.0.0/24", "dev": "eth0"},
        {"dst": "192.168.200.7", "dev": "tun0"},
    ]
    links = [
        {"ifname": "lo", "addr_info": [{"local": "127.0.0.1", "prefixlen": 8}]},
        {"ifname": "virbr0", "addr_info": [{"local": "192.168.122.1", "prefixlen": 24}]},
    ]
    taken = subnets.parse_routes(routes) + subnets.parse_addresses(links)
    assert [str(t.net) for t in taken] == ["10.0.0.0/24", "192.168.200.7/32", "192.168.122.0/24"]
    assert taken[2].what == "address 192.168.122.1/24 on virbr0"
    assert subnets.collisions("192.168.200.0/24", taken)[0].what == "route 192.168.200.7 dev tun0"


def test_two_clusters_on_one_daemon_get_different_subnets_and_macs(backend: FakeBackend) -> None:
    one = cluster.up(ClusterSpec(name="one", connect=SHARED), backend=backend)
    # the second cluster prefers the first one's slot: it must move
    preferred = subnets.preferred_subnet
    try:
        subnets.preferred_subnet = lambda name: str(one.spec["subnet"])  # type: ignore[assignment]
        two = cluster.up(ClusterSpec(name="two", connect=SHARED), backend=backend)
    finally:
        subnets.preferred_subnet = preferred  # type: ignore[assignment]
    assert one.spec["subnet"] != two.spec["subnet"]
    nets = [ipaddress.IPv4Network(st.spec["subnet"]) for st in (one, two)]
    assert not nets[0].overlaps(nets[1])
    macs = [vm.mac for st in (one, two) for vm in st.vms]
    addresses = [vm.address for st in (one, two) for vm in st.vms]
    assert len(set(macs)) == len(macs) and len(set(addresses)) == len(addresses)
    cluster.down("one", backend=backend)
    cluster.down("two", backend=backend)


def test_chosen_subnet_avoids_libvirt_networks_routes_and_bridges(backend: FakeBackend) -> None:
    name = "avoid"
    slot = subnets.preferred_subnet(name)
    net = ipaddress.IPv4Network(slot)
    nxt = subnets.slots()[(subnets.slots().index(net) + 1) % len(subnets.slots())]
    third = subnets.slots()[(subnets.slots().index(net) + 2) % len(subnets.slots())]
    _default_network(backend, "default", slot)  # a libvirt network on the preferred slot
    backend.host_nets = [Taken(nxt, "address 192.168.x.1/24 on br-lan")]  # a bridge on the next
    st = cluster.up(ClusterSpec(name=name, connect=SHARED), backend=backend)
    assert st.spec["subnet"] == str(third)
    cluster.down(name, backend=backend)


@pytest.mark.parametrize(
    ("setup", "what"),
    [
        ("libvirt", "libvirt network 'default' (192.168.122.0/24)"),
        ("route", "route 192.168.122.0/24 dev eth1"),
        ("cluster", "gcvm cluster 'first'"),
    ],
)
def test_explicit_colliding_subnet_is_refused_naming_it(
    backend: FakeBackend, setup: str, what: str
) -> None:
    subnet = "192.168.122.0/24"
    if setup == "libvirt":
        _default_network(backend, "default", subnet)
    elif setup == "route":
        backend.host_nets = [
            Taken(ipaddress.IPv4Network(subnet), "route 192.168.122.0/24 dev eth1")
        ]
    else:
        cluster.up(ClusterSpec(name="first", connect=SHARED, subnet=subnet), backend=backend)
    before = {d.name for d in backend.hv.domains()}
    with pytest.raises(UsageError) as err:
        cluster.up(ClusterSpec(name="second", connect=SHARED, subnet=subnet), backend=backend)
    assert f"--subnet {subnet} collides with {what}" in err.value.message
    assert err.value.exit_code == 2
    assert {d.name for d in backend.hv.domains()} == before  # nothing of "second" was made
    assert not (backend.hv.networks.keys() & {"gcvm-second"})
    if setup == "cluster":
        cluster.down("first", backend=backend)


def test_private_clusters_accept_any_subnet_and_still_differ(backend: FakeBackend) -> None:
    backend.host_nets = [Taken(ipaddress.IPv4Network("192.168.122.0/24"), "address on virbr0")]
    a = cluster.up(ClusterSpec(name="pa", subnet="192.168.122.0/24"), backend=backend)  # own netns
    b = cluster.up(ClusterSpec(name="pb"), backend=backend)
    assert a.spec["subnet"] == "192.168.122.0/24" and b.spec["subnet"] != a.spec["subnet"]
    assert {vm.mac for vm in a.vms}.isdisjoint(vm.mac for vm in b.vms)
    cluster.down("pa", backend=backend)
    cluster.down("pb", backend=backend)


def test_existing_network_lends_its_subnet(backend: FakeBackend) -> None:
    _default_network(backend, "shared", "10.77.0.0/24")
    st = cluster.up(ClusterSpec(name="ex", connect=SHARED, network="shared"), backend=backend)
    assert st.spec["subnet"] == "10.77.0.0/24"
    assert all(vm.address.startswith("10.77.0.") for vm in st.vms)
    cluster.down("ex", backend=backend)
    with pytest.raises(UsageError, match="no such libvirt network"):
        cluster.up(ClusterSpec(name="ex", connect=SHARED, network="nosuch"), backend=backend)


def test_macs_carry_the_cluster(tmp_path: Path) -> None:
    a = plan_vms(ClusterSpec(name="a", subnet="10.1.0.0/24"), tmp_path)
    b = plan_vms(ClusterSpec(name="b", subnet="10.1.0.0/24"), tmp_path)
    assert [vm.address for vm in a] == [vm.address for vm in b]
    assert {vm.mac for vm in a}.isdisjoint(vm.mac for vm in b)
