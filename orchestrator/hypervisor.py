"""A narrow interface over libvirt-python, and an in-memory fake with the same behaviour.

Only what the cluster flow needs: networks (define, start, DHCP host entries, remove), domains
(define + start, destroy + undefine, list those carrying gcvm metadata, state, lease address).
"""

from __future__ import annotations

import contextlib
import threading
import time
import xml.etree.ElementTree as ET
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from orchestrator.errors import HypervisorError
from orchestrator.ui import log


@dataclass(frozen=True)
class DomainInfo:
    name: str
    cluster: str | None  # from gcvm's metadata; None for a domain gcvm did not create
    state: str  # running, shut off, ...
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DomainStats:
    cpu_ns: int  # cumulative CPU time of the whole domain (vCPUs and QEMU's own threads)
    rss_kib: int  # resident memory of its QEMU process (0: libvirt did not say)
    memory_kib: int  # memory given to the guest
    vcpus: int


@dataclass(frozen=True)
class DhcpHost:
    mac: str
    name: str
    ip: str

    def xml(self) -> str:
        el = ET.Element("host", mac=self.mac, name=self.name, ip=self.ip)
        return ET.tostring(el, encoding="unicode")


def parse_metadata(domain_xml: str) -> dict[str, Any]:
    """gcvm's metadata in a domain's XML ({} when it carries none)."""
    from orchestrator import render

    return dict(render.parse_metadata(domain_xml) or {})


def network_ipv4(network_xml: str) -> list[str]:
    """The IPv4 networks (CIDR) a libvirt network's XML puts on its bridge."""
    import ipaddress

    out = []
    for ip in ET.fromstring(network_xml).iterfind("./ip"):
        if ip.get("family", "ipv4") != "ipv4" or not ip.get("address"):
            continue
        mask = ip.get("prefix") or ip.get("netmask") or "24"
        with contextlib.suppress(ValueError):
            out.append(str(ipaddress.IPv4Network(f"{ip.get('address')}/{mask}", strict=False)))
    return out


def cluster_of(metadata: dict[str, Any]) -> str | None:
    value = metadata.get("cluster")
    return str(value) if value else None


class Hypervisor(ABC):
    """What gcvm asks of libvirt."""

    uri: str

    @abstractmethod
    def network_exists(self, name: str) -> bool: ...

    @abstractmethod
    def define_network(self, xml: str, *, start: bool = True) -> str:
        """Define (persistently) and start a network; returns its name."""

    @abstractmethod
    def remove_network(self, name: str) -> bool:
        """Destroy and undefine; False when there was none."""

    @abstractmethod
    def dhcp_hosts(self, network: str) -> list[DhcpHost]: ...

    @abstractmethod
    def network_subnets(self) -> list[tuple[str, str]]:
        """(name, IPv4 CIDR) of every network the daemon has, active or not."""

    @abstractmethod
    def add_dhcp_host(self, network: str, host: DhcpHost) -> None: ...

    @abstractmethod
    def remove_dhcp_host(self, network: str, host: DhcpHost) -> None: ...

    @abstractmethod
    def start_domain(self, xml: str) -> str:
        """Define (persistently) and start a domain; returns its name."""

    @abstractmethod
    def remove_domain(self, name: str) -> bool:
        """Destroy (if running) and undefine; False when there was none."""

    @abstractmethod
    def domains(self) -> list[DomainInfo]: ...

    @abstractmethod
    def lease_address(self, domain: str, mac: str) -> str | None:
        """The IPv4 address the network's DHCP server leased to `mac` (None: no lease yet)."""

    @abstractmethod
    def versions(self) -> dict[str, str]:
        """libvirt's and the hypervisor's versions."""

    @abstractmethod
    def close(self) -> None: ...

    def domain_stats(self) -> dict[str, DomainStats]:
        """Running domains' cumulative CPU time and memory (libvirt's domain statistics)."""
        return {}

    def cluster_domains(self, cluster: str) -> list[DomainInfo]:
        return [d for d in self.domains() if d.cluster == cluster]

    def __enter__(self) -> Hypervisor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _version(n: int) -> str:
    return f"{n // 1_000_000}.{n // 1000 % 1000}.{n % 1000}"


class LibvirtHypervisor(Hypervisor):
    def __init__(self, uri: str) -> None:
        import libvirt

        self._libvirt = libvirt
        self.uri = uri
        # libvirt prints every error to stderr by itself; gcvm reports them as HypervisorError
        libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
        try:
            self._conn = libvirt.open(uri)
        except libvirt.libvirtError as exc:
            raise HypervisorError(
                f"cannot connect to libvirt at {uri}: {exc}",
                hint="is the daemon running? `gcvm down` cleans up a cluster "
                "whose private daemon died",
            ) from None

    @property
    def conn(self) -> Any:
        """The libvirt connection itself (for host probing)."""
        return self._conn

    def _call(self, what: str, fn: Callable[[], Any]) -> Any:
        log.debug("libvirt: %s", what)
        try:
            return fn()
        except self._libvirt.libvirtError as exc:
            raise HypervisorError(f"libvirt failed to {what}: {exc}") from None

    def _network(self, name: str) -> Any | None:
        try:
            return self._conn.networkLookupByName(name)
        except self._libvirt.libvirtError:
            return None

    def _domain(self, name: str) -> Any | None:
        try:
            return self._conn.lookupByName(name)
        except self._libvirt.libvirtError:
            return None

    def network_exists(self, name: str) -> bool:
        return self._network(name) is not None

    def define_network(self, xml: str, *, start: bool = True) -> str:
        net = self._call("define a network", lambda: self._conn.networkDefineXML(xml))
        if start and not net.isActive():
            self._call(f"start network {net.name()}", net.create)
        return str(net.name())

    def remove_network(self, name: str) -> bool:
        net = self._network(name)
        if net is None:
            return False
        if net.isActive():
            self._call(f"stop network {name}", net.destroy)
        if net.isPersistent():
            self._call(f"undefine network {name}", net.undefine)
        return True

    def dhcp_hosts(self, network: str) -> list[DhcpHost]:
        net = self._network(network)
        if net is None:
            raise HypervisorError(f"no libvirt network {network!r}")
        root = ET.fromstring(net.XMLDesc(0))
        return [
            DhcpHost(h.get("mac", ""), h.get("name", ""), h.get("ip", ""))
            for h in root.iterfind("./ip/dhcp/host")
        ]

    def network_subnets(self) -> list[tuple[str, str]]:
        nets = self._call("list networks", lambda: self._conn.listAllNetworks(0))
        return [(str(n.name()), cidr) for n in nets for cidr in network_ipv4(n.XMLDesc(0))]

    def _update_host(self, network: str, host: DhcpHost, command: int) -> None:
        lv = self._libvirt
        net = self._network(network)
        if net is None:
            raise HypervisorError(f"no libvirt network {network!r}")
        flags = lv.VIR_NETWORK_UPDATE_AFFECT_CONFIG
        if net.isActive():
            flags |= lv.VIR_NETWORK_UPDATE_AFFECT_LIVE
        self._call(
            f"update DHCP host {host.ip} in {network}",
            lambda: net.update(command, lv.VIR_NETWORK_SECTION_IP_DHCP_HOST, -1, host.xml(), flags),
        )

    def add_dhcp_host(self, network: str, host: DhcpHost) -> None:
        self._update_host(network, host, self._libvirt.VIR_NETWORK_UPDATE_COMMAND_ADD_LAST)

    def remove_dhcp_host(self, network: str, host: DhcpHost) -> None:
        if host in self.dhcp_hosts(network):
            self._update_host(network, host, self._libvirt.VIR_NETWORK_UPDATE_COMMAND_DELETE)

    def start_domain(self, xml: str) -> str:
        dom = self._call("define a domain", lambda: self._conn.defineXML(xml))
        self._call(f"start domain {dom.name()}", dom.create)
        return str(dom.name())

    def remove_domain(self, name: str) -> bool:
        dom = self._domain(name)
        if dom is None:
            return False
        if dom.isActive():
            self._call(f"destroy domain {name}", dom.destroy)
        lv = self._libvirt
        flags = lv.VIR_DOMAIN_UNDEFINE_NVRAM | lv.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
        if dom.isPersistent():
            self._call(f"undefine domain {name}", lambda: dom.undefineFlags(flags))
        return True

    _STATES: ClassVar[dict[int, str]] = {
        1: "running",
        2: "blocked",
        3: "paused",
        4: "shutting down",
        5: "shut off",
        6: "crashed",
        7: "suspended",
    }

    def domains(self) -> list[DomainInfo]:
        out = []
        for dom in self._call("list domains", self._conn.listAllDomains):
            meta = parse_metadata(dom.XMLDesc(0))
            state = self._STATES.get(dom.state()[0], "unknown")
            out.append(DomainInfo(dom.name(), cluster_of(meta), state, meta))
        return out

    def lease_address(self, domain: str, mac: str) -> str | None:
        dom = self._domain(domain)
        if dom is None or not dom.isActive():
            return None
        src = self._libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_LEASE
        try:
            ifaces = dom.interfaceAddresses(src)
        except self._libvirt.libvirtError:
            return None
        for iface in ifaces.values():
            if (iface.get("hwaddr") or "").lower() == mac.lower():
                for addr in iface.get("addrs") or []:
                    if addr.get("type") == self._libvirt.VIR_IP_ADDR_TYPE_IPV4:
                        return str(addr["addr"])
        return None

    def versions(self) -> dict[str, str]:
        return {
            "libvirt": _version(self._conn.getLibVersion()),
            "hypervisor": _version(self._conn.getVersion()),
            "driver": str(self._conn.getType()),
        }

    def domain_stats(self) -> dict[str, DomainStats]:
        lv = self._libvirt
        groups = (
            lv.VIR_DOMAIN_STATS_CPU_TOTAL | lv.VIR_DOMAIN_STATS_BALLOON | lv.VIR_DOMAIN_STATS_VCPU
        )
        records = self._call(
            "read domain statistics",
            lambda: self._conn.getAllDomainStats(
                groups, lv.VIR_CONNECT_GET_ALL_DOMAINS_STATS_ACTIVE
            ),
        )
        out = {}
        for dom, rec in records:
            vcpus = int(rec.get("vcpu.current", 0))
            # without cgroups (a private daemon in a namespace) there may be no cpu.time:
            # then the vCPU threads' own times (QEMU's other threads not counted)
            cpu = rec.get("cpu.time")
            if cpu is None:
                cpu = sum(int(rec.get(f"vcpu.{i}.time", 0)) for i in range(vcpus))
            out[dom.name()] = DomainStats(
                cpu_ns=int(cpu),
                rss_kib=int(rec.get("balloon.rss", 0)),
                memory_kib=int(rec.get("balloon.maximum") or rec.get("balloon.current") or 0),
                vcpus=vcpus,
            )
        return out

    def close(self) -> None:
        with contextlib.suppress(self._libvirt.libvirtError):
            self._conn.close()


class FakeHypervisor(Hypervisor):
    """In memory, thread-safe; behaves like the libvirt one for everything gcvm relies on."""

    def __init__(self, uri: str = "fake:///") -> None:
        self.uri = uri
        self.networks: dict[str, dict[str, Any]] = {}
        self.defined: dict[str, str] = {}  # name -> XML
        self.running: set[str] = set()
        self.leases: dict[str, str] = {}  # mac -> ip, set once a "guest" asked for one
        self.fail_start: set[str] = set()
        self.closed = False
        self._lock = threading.Lock()
        self._born = time.monotonic()

    def network_exists(self, name: str) -> bool:
        return name in self.networks

    def define_network(self, xml: str, *, start: bool = True) -> str:
        root = ET.fromstring(xml)
        name = root.findtext("name") or ""
        hosts = [
            DhcpHost(h.get("mac", ""), h.get("name", ""), h.get("ip", ""))
            for h in root.iterfind("./ip/dhcp/host")
        ]
        with self._lock:
            self.networks[name] = {"active": start, "hosts": hosts, "xml": xml}
        return name

    def network_subnets(self) -> list[tuple[str, str]]:
        with self._lock:
            nets = {name: dict(net) for name, net in self.networks.items()}
        return [(n, cidr) for n, net in nets.items() for cidr in network_ipv4(net["xml"])]

    def remove_network(self, name: str) -> bool:
        with self._lock:
            return self.networks.pop(name, None) is not None

    def dhcp_hosts(self, network: str) -> list[DhcpHost]:
        if network not in self.networks:
            raise HypervisorError(f"no libvirt network {network!r}")
        return list(self.networks[network]["hosts"])

    def add_dhcp_host(self, network: str, host: DhcpHost) -> None:
        hosts = self.dhcp_hosts(network)
        if any(h.mac == host.mac or h.ip == host.ip for h in hosts):
            raise HypervisorError(f"DHCP host {host.ip} already exists in {network}")
        with self._lock:
            self.networks[network]["hosts"].append(host)

    def remove_dhcp_host(self, network: str, host: DhcpHost) -> None:
        with self._lock:
            if network in self.networks and host in self.networks[network]["hosts"]:
                self.networks[network]["hosts"].remove(host)

    def start_domain(self, xml: str) -> str:
        root = ET.fromstring(xml)
        name = root.findtext("name") or ""
        with self._lock:
            self.defined[name] = xml
            if name in self.fail_start:
                raise HypervisorError(f"libvirt failed to start domain {name}: fake failure")
            self.running.add(name)
            for iface in root.iterfind("./devices/interface/mac"):
                mac = iface.get("address", "")
                for net in self.networks.values():
                    for h in net["hosts"]:
                        if h.mac == mac:
                            self.leases[mac] = h.ip
        return name

    def remove_domain(self, name: str) -> bool:
        with self._lock:
            self.running.discard(name)
            return self.defined.pop(name, None) is not None

    def domains(self) -> list[DomainInfo]:
        with self._lock:
            items = list(self.defined.items())
        out = []
        for name, xml in items:
            meta = parse_metadata(xml)
            state = "running" if name in self.running else "shut off"
            out.append(DomainInfo(name, cluster_of(meta), state, meta))
        return out

    def lease_address(self, domain: str, mac: str) -> str | None:
        return self.leases.get(mac) if domain in self.running else None

    def versions(self) -> dict[str, str]:
        return {"libvirt": "0.0.0", "hypervisor": "0.0.0", "driver": "fake"}

    def domain_stats(self) -> dict[str, DomainStats]:
        """Every running domain busy on one core since the fake started, 1 GiB resident."""
        with self._lock:
            running = sorted(self.running)
        spent = int((time.monotonic() - self._born) * 1e9)
        return {name: DomainStats(spent, 1 << 20, 2 << 20, 1) for name in running}

    def close(self) -> None:
        self.closed = True
