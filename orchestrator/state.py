"""One JSON state file per cluster, and the lock that `up`, `run` and `down` share.

The state file is written atomically (temporary file + rename). The lock is an fcntl lock on a
lock file beside the cluster folders (`clusters/<name>.lock`), not inside them: `down` removes the
cluster's folder while it still holds the lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator import paths
from orchestrator.errors import ClusterNotFound, GcvmError
from orchestrator.spec import Tee, check_name

if TYPE_CHECKING:
    from orchestrator.clusterbroker import ClusterBrokerState
    from orchestrator.hostworker import HostWorkerState

STATE_FILE = "state.json"
FORMAT = 1


class ClusterBusy(GcvmError):
    pass


class StateCorrupt(GcvmError):
    pass


@dataclass(frozen=True)
class VmState:
    name: str
    role: str
    rank: int
    index: int
    address: str
    mac: str
    tee: Tee  # requested
    vcpus: int
    memory_mib: int
    ifname: str = ""  # the guest's interface for `mac`, read inside the guest after boot
    tee_verified: str = ""  # what the guest reports: none, tdx or sev-snp
    tee_evidence: str = ""  # the line that says so (dmesg, device node)
    disk: str = ""
    seed: str = ""
    serial_log: str = ""
    locked: bool = False  # a locked master: reached only through its job agent (no SSH)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VmState:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in d.items() if k in known}
        values["tee"] = Tee(values["tee"])
        return cls(**values)


@dataclass(frozen=True)
class ClusterState:
    name: str
    spec: dict[str, Any]  # the ClusterSpec, as given
    uri: str  # libvirt URI (with the private socket when gcvm runs the daemon)
    netns: str | None  # the namespace every guest connection is made from (None: the host's)
    network: str  # the libvirt network the VMs are on
    own_network: bool  # gcvm defined the network (down removes it) or only added DHCP entries
    client_key: Path
    known_hosts: Path
    private_daemon: dict[str, Any] | None = None  # pids and folders of gcvm's own daemons
    image: dict[str, Any] = field(default_factory=dict)  # recipe hash, guest python, paths
    host: dict[str, Any] = field(default_factory=dict)  # QEMU/libvirt versions, accel
    vms: list[VmState] = field(default_factory=list)
    host_worker: dict[str, Any] | None = None  # `--worker host`: orchestrator.hostworker's record
    broker: dict[str, Any] | None = None  # `--broker`: orchestrator.clusterbroker's record
    trust: dict[str, Any] | None = None  # the owner's identities pinned in every guest's boot
    phase: str = "creating"  # creating, ready
    created: float = field(default_factory=time.time)
    format: int = FORMAT

    @property
    def dir(self) -> Path:
        return cluster_dir(self.name)

    def vm(self, name: str) -> VmState:
        """A VM by its full name, its short name (master0) or its rank."""
        for vm in self.vms:
            if name in (vm.name, vm.name.removeprefix(f"{self.name}-"), str(vm.rank)):
                return vm
        known = ", ".join(v.name for v in self.vms) or "none"
        if self.is_host_worker(name):
            raise GcvmError(
                f"{name} is the host worker, a process on this host, not a VM",
                hint="`gcvm logs worker-host` shows its output; `gcvm status` its pid",
            )
        raise GcvmError(f"cluster {self.name} has no VM {name!r}", hint=f"VMs: {known}")

    @property
    def worker_host(self) -> HostWorkerState | None:
        """The host worker (`gcvm up --worker host`), or None when the workers are VMs."""
        from orchestrator.hostworker import HostWorkerState

        return None if self.host_worker is None else HostWorkerState.from_dict(self.host_worker)

    @property
    def cluster_broker(self) -> ClusterBrokerState | None:
        """The cluster's key broker (`gcvm up --broker`), or None (runs start their own)."""
        from orchestrator.clusterbroker import ClusterBrokerState

        return None if self.broker is None else ClusterBrokerState.from_dict(self.broker)

    def is_host_worker(self, name: str) -> bool:
        hw = self.worker_host
        return hw is not None and name in (hw.name, hw.short, str(hw.rank))

    def with_vms(self, vms: list[VmState]) -> ClusterState:
        return replace(self, vms=list(vms))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["client_key"] = str(self.client_key)
        d["known_hosts"] = str(self.known_hosts)
        d["vms"] = [{**asdict(vm), "tee": str(vm.tee)} for vm in self.vms]
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ClusterState:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in d.items() if k in known}
        values["client_key"] = Path(values["client_key"])
        values["known_hosts"] = Path(values["known_hosts"])
        values["vms"] = [VmState.from_dict(v) for v in values.get("vms", [])]
        return cls(**values)

    @classmethod
    def from_json(cls, text: str) -> ClusterState:
        return cls.from_dict(json.loads(text))


def cluster_dir(name: str) -> Path:
    return paths.cluster_dir(check_name(name))


def state_path(name: str) -> Path:
    return cluster_dir(name) / STATE_FILE


def lock_path(name: str) -> Path:
    return paths.state_root() / "clusters" / f"{check_name(name)}.lock"


def exists(name: str) -> bool:
    return state_path(name).exists()


def names() -> list[str]:
    root = paths.state_root() / "clusters"
    return sorted(p.parent.name for p in root.glob(f"*/{STATE_FILE}")) if root.is_dir() else []


def load(name: str) -> ClusterState:
    path = state_path(name)
    try:
        text = path.read_text()
    except FileNotFoundError:
        others = names()
        hint = (
            f"clusters here: {', '.join(others)}; pass --name"
            if others
            else "start one with `gcvm up --tee none --workers 1`"
        )
        raise ClusterNotFound(f"no cluster named {name!r} (no {path})", hint=hint) from None
    try:
        return ClusterState.from_json(text)
    except (ValueError, KeyError, TypeError) as exc:
        raise StateCorrupt(
            f"cannot read {path}: {exc}",
            hint=f"`gcvm down --name {name}` still removes what it finds",
        ) from None


def save(st: ClusterState) -> Path:
    path = state_path(st.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(st.to_json())
    os.replace(tmp, path)
    return path


def remove(name: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        state_path(name).unlink()


@contextlib.contextmanager
def locked(name: str, wait: float = 10.0) -> Iterator[None]:
    """Hold the cluster's lock; wait up to `wait` seconds for another gcvm command to finish.

    Reentrant within one process (a command that calls another's function keeps its lock).
    """
    key = str(lock_path(name))
    if key in _held:
        _held[key] += 1
        try:
            yield
        finally:
            _held[key] -= 1
        return
    path = Path(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + wait
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            _flock(fd, deadline, name, path)
        except BaseException:
            os.close(fd)
            raise
        # The holder before us may have removed the file (below): then our lock is on a
        # deleted inode, and a newcomer could lock a new file at the same path. Retry.
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        _held[key] = 1
        try:
            yield
        finally:
            del _held[key]
            # No cluster left (down finished, up refused, a typo'd name): leave no lock behind.
            if not cluster_dir(name).exists():
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _flock(fd: int, deadline: float, name: str, path: Path) -> None:
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise ClusterBusy(
                    f"cluster {name!r} is busy: another gcvm command holds {path}",
                    hint="wait for it to finish (up, run and down take turns)",
                ) from None
            time.sleep(0.1)


_held: dict[str, int] = {}
