"""A subnet of its own for every cluster, and MACs that carry the cluster.

Without `--subnet`, a cluster takes a /24 from POOL, starting at a slot derived from its name and
skipping every network that is taken where its daemon can see it: on a shared daemon
(`--connect`) the host's routes and interface addresses (bridges included) and the daemon's own
libvirt networks; everywhere, the subnets of the other gcvm clusters on the same daemon. A
private daemon lives in a namespace of its own, where nothing else is routed. An explicit
`--subnet` that overlaps something taken is refused, naming it.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from orchestrator.errors import UsageError
from orchestrator.ui import log

# 192.168.128.0-192.168.255.255: clear of libvirt's default network (192.168.122.0/24) and of
# the 192.168.0.x / 192.168.1.x that home routers hand out.
POOL = ipaddress.IPv4Network("192.168.128.0/17")
SLOT_PREFIX = 24


@dataclass(frozen=True)
class Taken:
    """A network something else uses, and what that is, in words."""

    net: ipaddress.IPv4Network
    what: str


def _digest(name: str) -> bytes:
    return hashlib.sha256(f"gcvm-cluster/{name}".encode()).digest()


def slots() -> list[ipaddress.IPv4Network]:
    return list(POOL.subnets(new_prefix=SLOT_PREFIX))


def preferred_subnet(name: str) -> str:
    """The /24 a cluster of this name takes when nothing else has it (deterministic)."""
    pool = slots()
    return str(pool[int.from_bytes(_digest(name)[:2], "big") % len(pool)])


def cluster_mac_part(name: str) -> tuple[int, int]:
    """Two bytes of the cluster's MACs that come from its name."""
    digest = _digest(name)
    return digest[2], digest[3]


def collisions(subnet: str, taken: Iterable[Taken]) -> list[Taken]:
    net = ipaddress.IPv4Network(subnet)
    return [t for t in taken if t.net.overlaps(net)]


def choose(name: str, taken: Sequence[Taken]) -> str:
    """The first free /24 of POOL from the name's own slot on."""
    pool = slots()
    start = pool.index(ipaddress.IPv4Network(preferred_subnet(name)))
    for i in range(len(pool)):
        candidate = pool[(start + i) % len(pool)]
        if not collisions(str(candidate), taken):
            return str(candidate)
    raise UsageError(
        f"no free /{SLOT_PREFIX} left in {POOL} for cluster {name!r}",
        hint="pass --subnet with a free IPv4 network",
    )


def refuse_collisions(subnet: str, taken: Sequence[Taken]) -> None:
    """An explicit --subnet must not overlap anything taken: UsageError naming what it meets."""
    hits = collisions(subnet, taken)
    if hits:
        names = "; ".join(f"{t.what} ({t.net})" for t in hits)
        raise UsageError(
            f"--subnet {subnet} collides with {names}",
            hint="choose another --subnet, or leave it out to get a free one",
        )


# ---------------------------------------------------------------------------------------------
# What is taken, by source


def _ip_json(*args: str) -> list[dict]:
    try:
        proc = subprocess.run(
            ["ip", "-j", "-4", *args], capture_output=True, text=True, timeout=10, check=False
        )
        data = json.loads(proc.stdout or "[]")
    except (OSError, subprocess.TimeoutExpired, ValueError) as exc:
        log.debug("ip -j -4 %s failed: %s", " ".join(args), exc)
        return []
    return data if isinstance(data, list) else []


def parse_routes(routes: Sequence[dict]) -> list[Taken]:
    """`ip -j -4 route show` entries; the default route covers everything and is left out."""
    out = []
    for route in routes:
        dst = str(route.get("dst", ""))
        if not dst or dst == "default":
            continue
        try:
            net = ipaddress.IPv4Network(dst, strict=False)
        except ValueError:
            continue
        dev = route.get("dev")
        out.append(Taken(net, f"route {dst}" + (f" dev {dev}" if dev else "")))
    return out


def parse_addresses(links: Sequence[dict]) -> list[Taken]:
    """`ip -j -4 addr show` entries: every interface's networks (bridges included)."""
    out = []
    for link in links:
        for info in link.get("addr_info", []):
            try:
                net = ipaddress.IPv4Network(f"{info['local']}/{info['prefixlen']}", strict=False)
            except (KeyError, ValueError):
                continue
            if net.is_loopback:
                continue
            out.append(
                Taken(net, f"address {info['local']}/{info['prefixlen']} on {link.get('ifname')}")
            )
    return out


def host_networks() -> list[Taken]:
    """This host's routes and interface addresses (the namespace gcvm itself runs in)."""
    return parse_routes(_ip_json("route", "show")) + parse_addresses(_ip_json("addr", "show"))


def libvirt_networks(subnets: Iterable[tuple[str, str]]) -> list[Taken]:
    out = []
    for name, cidr in subnets:
        try:
            out.append(
                Taken(ipaddress.IPv4Network(cidr, strict=False), f"libvirt network {name!r}")
            )
        except ValueError:
            continue
    return out


def cluster_networks(clusters: Iterable[tuple[str, str, str]], name: str, uri: str) -> list[Taken]:
    """The subnets of the other gcvm clusters (name, libvirt URI, subnet) on the same daemon."""
    out = []
    for other, other_uri, cidr in clusters:
        if other == name or other_uri != uri or not cidr:
            continue
        try:
            out.append(Taken(ipaddress.IPv4Network(cidr), f"gcvm cluster {other!r}"))
        except ValueError:
            continue
    return out
