"""Typed settings: a ClusterSpec from the CLI, and the per-VM and per-rank specs derived from it.

Every enum's values are the strings the outside world uses (libvirt, the CLI), so a value can be
written into XML or parsed from a flag without a translation table.
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
import re
import uuid
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from urllib.parse import urlsplit

from orchestrator import subnets
from orchestrator.errors import UsageError


class Tee(StrEnum):
    none = "none"
    tdx = "tdx"
    sev_snp = "sev-snp"


class Accel(StrEnum):
    auto = "auto"
    kvm = "kvm"
    tcg = "tcg"


class Role(StrEnum):
    master = "master"
    worker = "worker"


# torch + MiniLM + the guest's own userspace need about this much; below it the guest OOMs.
MIN_MEMORY_MIB = 1536
MAX_VMS = 64
NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,19}$")
# First host number handed to a VM; .1 is the bridge.
FIRST_HOST = 10


def check_name(name: str) -> str:
    """A cluster name: it becomes folder, namespace, domain and bridge names, so nothing that
    could leave its folder (`..`, `/`) or break them gets through."""
    if not NAME_RE.match(name):
        raise UsageError(
            f"invalid cluster name {name!r}",
            hint="use 1-20 characters: a lowercase letter, then lowercase letters, digits or '-'",
        )
    return name


@dataclass(frozen=True)
class ClusterSpec:
    name: str = "gcvm"
    tee: Tee = Tee.none
    worker_tee: Tee | None = None  # None: the workers get `tee` too (as the seed ran them)
    accel: Accel = Accel.auto
    masters: int = 1
    workers: int = 1
    vcpus: int = 1
    memory_mib: int = 2048
    image: Path | None = None  # None: gcvm's own built image
    subnet: str | None = None  # None: a free /24 chosen for the cluster (orchestrator.subnets)
    network: str | None = None  # an existing libvirt network (with --connect); None: gcvm's own
    connect: str | None = None  # libvirt URI; None: a private daemon in a network namespace
    worker_host: bool = False  # the one worker is a process on the host, not a VM (`--worker host`)
    worker_threads: int | None = None  # the host worker's CPU threads (None: see host_threads)
    broker: bool = False  # `--broker`: the owner's key broker for the cluster's lifetime
    broker_policy: str | None = None  # its policy file (needed with a TEE)
    owner: str | None = None  # the owner folder (identities, keys); default owner_dir(name)
    locked: bool = False  # `--locked`: masters as under a TEE (no SSH, measured code only)

    def __post_init__(self) -> None:
        self.validate()

    @property
    def locked_masters(self) -> bool:
        """Whether the masters are locked: always under a TEE (a confidential master the host
        could log into protects nothing), and with `--locked` under --tee none (to run and test
        the same behaviour without one)."""
        return self.locked or self.tee in (Tee.tdx, Tee.sev_snp)

    def validate(self) -> None:
        check_name(self.name)
        if self.masters < 1:
            raise UsageError(f"--masters must be at least 1, not {self.masters}")
        if self.worker_host:
            self._validate_worker_host()
        elif self.workers < 1:
            raise UsageError(
                f"--workers must be at least 1, not {self.workers}",
                hint="GroupCover offloads to at least one worker; use --workers 1",
            )
        self._validate_broker()
        if self.masters + self.workers > MAX_VMS:
            raise UsageError(
                f"at most {MAX_VMS} VMs per cluster, asked for {self.masters + self.workers}"
            )
        if (
            self.worker_tee is not None
            and Tee.none not in (self.tee, self.worker_tee)
            and self.tee is not self.worker_tee
        ):
            raise UsageError(
                f"--tee {self.tee} with --worker-tee {self.worker_tee} mixes two vendors' TEEs",
                hint="one host offers TDX (Intel) or SEV-SNP (AMD), not both; "
                "use --worker-tee none or the same TEE",
            )
        if self.vcpus < 1:
            raise UsageError(f"--vcpus must be at least 1, not {self.vcpus}")
        if self.memory_mib < MIN_MEMORY_MIB:
            raise UsageError(
                f"--memory {self.memory_mib} MiB is too small",
                hint=f"torch and the model need at least {MIN_MEMORY_MIB} MiB per VM "
                "(default 2048)",
            )
        if self.connect is not None:
            check_connect_uri(self.connect)
        if self.network is not None and self.connect is None:
            raise UsageError(
                f"--network {self.network} needs --connect",
                hint="a private daemon has no existing networks; leave out --network",
            )
        if self.subnet is None:
            return
        try:
            net = ipaddress.ip_network(self.subnet)
        except ValueError as exc:
            raise UsageError(f"invalid --subnet {self.subnet!r}: {exc}") from None
        if not isinstance(net, ipaddress.IPv4Network) or net.num_addresses < (
            FIRST_HOST + self.masters + self.workers + 2
        ):
            raise UsageError(f"--subnet {self.subnet} has too few IPv4 addresses for the cluster")

    def _validate_broker(self) -> None:
        if self.broker_policy is not None and not self.broker:
            raise UsageError("--policy is for the cluster's broker", hint="add --broker")
        if not self.broker:
            return
        if self.connect is not None:
            raise UsageError("--broker with --connect: the broker binds the bridge of the "
                             "cluster's own network, in its namespace",
                             hint="leave out --connect (or run `gcvm broker serve` "
                             "yourself)")  # fmt: skip
        if self.tee != Tee.none and self.broker_policy is None:
            raise UsageError(f"--broker with --tee {self.tee}: the broker needs a policy file",
                             hint="pass --policy FILE (accepted measurements / MRTD and RTMRs, "
                             "minimum TCB; see `gcvm broker serve --help`)")  # fmt: skip
        if self.broker_policy is not None and not Path(self.broker_policy).is_file():
            raise UsageError(f"--policy {self.broker_policy}: no such file")

    def _validate_worker_host(self) -> None:
        if self.workers != 0:
            raise UsageError(
                f"--worker host with --workers {self.workers}: the host runs the one worker",
                hint="leave out --workers (or use --worker vm --workers N for worker VMs)",
            )
        if self.worker_tee is not None:
            raise UsageError(
                f"--worker host with --worker-tee {self.worker_tee}: the host worker is a "
                "process, not a VM, and has no TEE",
                hint="leave out --worker-tee (the worker is untrusted by design)",
            )
        if self.network is not None:
            raise UsageError(
                f"--worker host with --network {self.network}: the host worker binds the "
                "bridge of the cluster's own network",
                hint="leave out --network",
            )
        if self.worker_threads is not None and not 1 <= self.worker_threads <= 1024:
            raise UsageError(f"--worker-threads {self.worker_threads} is out of range (1..1024)")

    def host_threads(self, cpus: int) -> int:
        """The host worker's intra-op threads: as given, else the host's CPUs less one per
        master vCPU (the masters' QEMU threads run on the same cores), at least one."""
        if self.worker_threads is not None:
            return self.worker_threads
        return max(1, cpus - self.masters * self.vcpus)

    @property
    def tee_of_workers(self) -> Tee:
        return self.worker_tee if self.worker_tee is not None else self.tee

    @property
    def tees(self) -> tuple[Tee, ...]:
        """The TEEs the cluster's VMs use, masters' first, without repeats."""
        if self.worker_host:
            return (self.tee,)
        return tuple(dict.fromkeys((self.tee, self.tee_of_workers)))

    @property
    def ipv4(self) -> ipaddress.IPv4Network:
        """The subnet; without one, the name's preferred /24 (`up` picks a free one first)."""
        net = ipaddress.ip_network(self.subnet or subnets.preferred_subnet(self.name))
        assert isinstance(net, ipaddress.IPv4Network)
        return net

    @property
    def gateway(self) -> str:
        return str(self.ipv4.network_address + 1)

    @property
    def netns(self) -> str:
        return f"gcvm-{self.name}"

    @property
    def network_name(self) -> str:
        return self.network or f"gcvm-{self.name}"


MAX_TIMEOUT_S = 7 * 86400
# libvirt URI transports (qemu+TRANSPORT://...) and the QEMU driver's daemon paths
URI_TRANSPORTS = ("", "unix", "ssh", "libssh", "libssh2", "tcp", "tls", "ext")
URI_PATHS = ("/system", "/session")
CONNECT_HINT = (
    "use qemu:///system (this host's libvirtd) or qemu+ssh://HOST/system; leave out --connect "
    "for a private daemon"
)


def check_connect_uri(uri: str, flag: str = "--connect") -> str:
    """A libvirt URI for the QEMU driver (gcvm renders QEMU domains), checked before any
    connection is tried: libvirt's own error for a wrong scheme talks about TLS certificates."""
    parsed = urlsplit(uri)
    driver, _, transport = parsed.scheme.partition("+")
    if not parsed.scheme or "://" not in uri:
        raise UsageError(f"{flag} {uri!r} is not a libvirt URI", hint=CONNECT_HINT)
    if driver != "qemu":
        raise UsageError(
            f"{flag} {uri!r} names libvirt's {driver!r} driver; gcvm needs the QEMU driver",
            hint=CONNECT_HINT,
        )
    if transport not in URI_TRANSPORTS:
        raise UsageError(
            f"{flag} {uri!r}: unknown libvirt transport {transport!r}",
            hint=f"use one of {', '.join(t for t in URI_TRANSPORTS if t)}, or qemu:///system "
            "for this host's daemon",
        )
    if parsed.path not in URI_PATHS:
        raise UsageError(
            f"{flag} {uri!r}: the QEMU driver's path is /system or /session, "
            f"not {parsed.path or '(none)'!r}",
            hint=CONNECT_HINT,
        )
    return uri


def check_timeout(flag: str, value: float) -> float:
    """A time limit given on the command line: a positive, finite number of seconds."""
    if not (math.isfinite(value) and 0 < value <= MAX_TIMEOUT_S):
        raise UsageError(
            f"{flag} {value:g} is out of range",
            hint=f"give a positive number of seconds (at most {MAX_TIMEOUT_S})",
        )
    return value


def mac_for(address: str, cluster: str) -> str:
    """A locally administered unicast MAC: 52:54, two bytes from the cluster's name, the low
    two bytes of the IPv4 address. Two clusters never share MACs, even on one subnet."""
    a = ipaddress.IPv4Address(address).packed
    c = subnets.cluster_mac_part(cluster)
    return f"52:54:{c[0]:02x}:{c[1]:02x}:{a[2]:02x}:{a[3]:02x}"


def stable_uuid(*parts: str) -> str:
    """The same inputs give the same UUID: golden files and re-renders stay byte-identical."""
    digest = hashlib.sha256("/".join(parts).encode()).digest()
    return str(uuid.UUID(bytes=digest[:16], version=4))


@dataclass(frozen=True)
class VmSpec:
    cluster: str
    name: str
    role: Role
    rank: int
    index: int  # index among VMs of the same role
    tee: Tee
    vcpus: int
    memory_mib: int
    address: str
    prefix: int
    gateway: str
    mac: str
    uuid: str
    disk: Path  # qcow2 overlay
    seed: Path  # seed ISO
    serial_log: Path
    locked: bool = False  # a locked master: no SSH, its code from the verified code disk


def plan_vms(spec: ClusterSpec, cluster_dir: Path) -> list[VmSpec]:
    """Masters take ranks 0..M-1 (rank 0 hosts the rendezvous), workers M..M+N-1."""
    vms: list[VmSpec] = []
    roles = [(Role.master, i) for i in range(spec.masters)] + [
        (Role.worker, i) for i in range(spec.workers)
    ]
    for rank, (role, index) in enumerate(roles):
        name = f"{spec.name}-{role.value}{index}"
        address = str(spec.ipv4.network_address + FIRST_HOST + rank)
        vms.append(
            VmSpec(
                cluster=spec.name,
                name=name,
                role=role,
                rank=rank,
                index=index,
                tee=spec.tee if role is Role.master else spec.tee_of_workers,
                vcpus=spec.vcpus,
                memory_mib=spec.memory_mib,
                address=address,
                prefix=spec.ipv4.prefixlen,
                gateway=spec.gateway,
                mac=mac_for(address, spec.name),
                uuid=stable_uuid("gcvm", spec.name, name),
                disk=cluster_dir / "disks" / f"{name}.qcow2",
                seed=cluster_dir / "disks" / f"{name}-seed.iso",
                serial_log=cluster_dir / "logs" / f"{name}.serial.log",
                locked=role is Role.master and spec.locked_masters,
            )
        )
    return vms


@dataclass(frozen=True)
class RankSpec:
    """One rank's settings for `python -m groupcover launch` (the framework's one entry point)."""

    role: Role
    rank: int
    world_size: int
    master_addr: str
    master_port: int
    ifname: str
    worker: int | None = None  # the rank a master offloads to (the seed's WORKER)
    extra: tuple[str, ...] = field(default_factory=tuple)  # model, modes, sizes, output path

    def argv(self, python: str = "python3") -> list[str]:
        argv = [
            python,
            "-m",
            "groupcover",
            "launch",
            "--role",
            self.role.value,
            "--rank",
            str(self.rank),
            "--world-size",
            str(self.world_size),
            "--master-addr",
            self.master_addr,
            "--master-port",
            str(self.master_port),
            "--ifname",
            self.ifname,
        ]
        if self.worker is not None:
            argv += ["--worker", str(self.worker)]
        return argv + list(self.extra)

    def env(self) -> dict[str, str]:
        """The seed's environment variables, for running the seed's own scripts unchanged."""
        env = {
            "RANK": str(self.rank),
            "WORLD_SIZE": str(self.world_size),
            "MASTER_ADDR": self.master_addr,
            "MASTER_PORT": str(self.master_port),
            "GLOO_SOCKET_IFNAME": self.ifname,
            "TP_SOCKET_IFNAME": self.ifname,
        }
        if self.worker is not None:
            env["WORKER"] = str(self.worker)
        return env


def plan_ranks(
    vms: list[VmSpec], master_port: int, ifnames: dict[str, str], extra: tuple[str, ...] = ()
) -> list[RankSpec]:
    """Master i offloads to worker (i mod N), as the seed's WORKER variable says."""
    masters = [vm for vm in vms if vm.role is Role.master]
    workers = [vm for vm in vms if vm.role is Role.worker]
    if not masters or not workers:
        raise UsageError("a run needs at least one master and one worker")
    rendezvous = masters[0].address
    ranks = []
    for vm in vms:
        target = workers[vm.index % len(workers)].rank if vm.role is Role.master else None
        ranks.append(
            RankSpec(
                role=vm.role,
                rank=vm.rank,
                world_size=len(vms),
                master_addr=rendezvous,
                master_port=master_port,
                ifname=ifnames[vm.name],
                worker=target,
                extra=extra,
            )
        )
    return ranks
