"""A private libvirt per cluster: its own virtlogd and libvirtd in the cluster's network namespace.

The daemons run in a mount namespace of their own (`unshare --mount --propagation private`) where
private folders are bind-mounted over libvirt's fixed paths (/run/libvirt, /var/lib/libvirt,
/var/log/libvirt, /etc/libvirt; /var/cache/libvirt is shared between clusters so the QEMU
capability probe runs once per host, not once per `up`). The bind mounts vanish with the
daemons' mount namespace; the host's own libvirt folders are never written. Because the daemons
run in the network namespace, the bridge, dnsmasq, the guests' taps and the NAT rules libvirt
installs all live there too. The client reaches the daemon through its socket on the host's side
of the bind mount: `qemu:///system?socket=<run dir>/libvirt/libvirt-sock`.

The run folder (sockets, pid files) sits under /run/gcvm: a unix socket path must stay under 108
bytes, which a deep state folder would not guarantee.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from orchestrator import netns, paths
from orchestrator.errors import GcvmError, HostUnsupported, Timeout
from orchestrator.privilege import GuestUser, guest_user
from orchestrator.spec import check_name
from orchestrator.ui import log

RUN_ROOT = Path("/run/gcvm")
SYSTEM_ETC = Path("/etc/libvirt")
MOUNTS = (
    "/run/libvirt",
    "/var/lib/libvirt",
    "/var/cache/libvirt",
    "/var/log/libvirt",
    "/etc/libvirt",
)
QEMU_CONF = """
# gcvm: a private daemon for one cluster, run by root inside its own namespaces. QEMU runs as
# {user}:{group}; libvirt's DAC driver hands it the cluster's disks, seeds and logs (and
# gives them back to root when the VM stops: remember_owner needs no xattrs then).
user = "{user}"
group = "{group}"
dynamic_ownership = 1
remember_owner = 0
security_driver = "none"
cgroup_controllers = [ ]
"""


def qemu_conf(user: GuestUser | None) -> str:
    """The private daemon's qemu.conf additions; QEMU as root only where the host has no
    unprivileged user for it."""
    return QEMU_CONF.format(
        user=user.user if user else "root", group=user.group if user else "root"
    )


START_TIMEOUT = 90.0


class DaemonError(GcvmError):
    pass


@dataclass(frozen=True)
class PrivateDaemon:
    netns: str
    root: Path  # per-cluster folders: lib, log, etc
    run_dir: Path  # sockets and pid files
    libvirtd_pid: int
    virtlogd_pid: int

    @property
    def socket(self) -> Path:
        return self.run_dir / "libvirt" / "libvirt-sock"

    @property
    def uri(self) -> str:
        return uri_for(self.run_dir)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(root=str(self.root), run_dir=str(self.run_dir), uri=self.uri)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PrivateDaemon:
        return cls(
            netns=d["netns"],
            root=Path(d["root"]),
            run_dir=Path(d["run_dir"]),
            libvirtd_pid=int(d["libvirtd_pid"]),
            virtlogd_pid=int(d["virtlogd_pid"]),
        )

    def alive(self) -> bool:
        return _is_process(self.libvirtd_pid, "libvirtd")

    def log_tail(self, lines: int = 20) -> str:
        return log_tail(self.root, lines)


def run_dir_for(cluster: str) -> Path:
    return RUN_ROOT / check_name(cluster)


def uri_for(run_dir: Path) -> str:
    return f"qemu:///system?socket={run_dir / 'libvirt' / 'libvirt-sock'}"


def shared_cache() -> Path:
    return paths.cache_root() / "libvirt"


def log_tail(root: Path, lines: int = 20) -> str:
    parts = []
    for name in ("libvirtd.log", "virtlogd.log"):
        f = root / "log" / name
        if f.exists():
            text = f.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {f} (last {len(text)} lines)\n" + "\n".join(text))
    return "\n".join(parts) or "(the daemons wrote no log)"


def _prepare(root: Path, run_dir: Path) -> dict[str, Path]:
    """The private folders, keyed by the path each one hides."""
    folders = {
        "/run/libvirt": run_dir / "libvirt",
        "/var/lib/libvirt": root / "lib",
        "/var/cache/libvirt": shared_cache(),
        "/var/log/libvirt": root / "log",
        "/etc/libvirt": root / "etc",
    }
    for host_path, folder in folders.items():
        folder.mkdir(parents=True, exist_ok=True)
        Path(host_path).mkdir(parents=True, exist_ok=True)  # the mount point itself
    etc = folders["/etc/libvirt"]
    if SYSTEM_ETC.is_dir():
        shutil.copytree(SYSTEM_ETC, etc, dirs_exist_ok=True, symlinks=True)
    # No autostarted `default` network: the cluster's own network takes virbr0.
    for xml in (etc / "qemu" / "networks").glob("**/*.xml"):
        xml.unlink()
    with open(etc / "qemu.conf", "a") as f:
        f.write(qemu_conf(guest_user()))
    for conf, logname in (("libvirtd.conf", "libvirtd.log"), ("virtlogd.conf", "virtlogd.log")):
        with open(etc / conf, "a") as f:
            f.write(f'\nlog_outputs = "3:file:/var/log/libvirt/{logname}"\n')
    return folders


def _start_script(folders: dict[str, Path], run_dir: Path) -> str:
    mounts = [
        f"mount --bind {shlex.quote(str(src))} {shlex.quote(dst)}" for dst, src in folders.items()
    ]
    daemons = [
        f"virtlogd -d -p {shlex.quote(str(run_dir / 'virtlogd.pid'))}",
        f"libvirtd -d -p {shlex.quote(str(run_dir / 'libvirtd.pid'))}",
    ]
    return " && ".join(["set -e", *mounts, *daemons])


def start(
    cluster: str, netns_name: str, root: Path, timeout: float = START_TIMEOUT
) -> PrivateDaemon:
    """Start virtlogd + libvirtd for the cluster inside `netns_name` (which must exist)."""
    for binary in ("libvirtd", "virtlogd", "unshare"):
        if shutil.which(binary) is None:
            raise HostUnsupported(
                f"`{binary}` is not installed",
                hint="scripts/install-system-deps.sh installs libvirt",
            )
    from orchestrator import hostcaps

    hostcaps.fix_kvm_permissions()
    run_dir = run_dir_for(cluster)
    folders = _prepare(root, run_dir)
    argv = netns.exec_argv(
        netns_name,
        [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            _start_script(folders, run_dir),
        ],
    )
    log.debug("run: %s", shlex.join(argv))
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise DaemonError(
            f"the private libvirt daemons did not start: {proc.stderr.strip()}\n{log_tail(root)}",
            hint="the daemons need root; see the log above",
        )
    daemon = PrivateDaemon(
        netns=netns_name,
        root=root,
        run_dir=run_dir,
        libvirtd_pid=_read_pid(run_dir / "libvirtd.pid"),
        virtlogd_pid=_read_pid(run_dir / "virtlogd.pid"),
    )
    wait_ready(daemon, timeout)
    return daemon


def _read_pid(pidfile: Path, timeout: float = 10.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            text = pidfile.read_text().strip()
            if text:
                return int(text)
        except FileNotFoundError:
            pass
        time.sleep(0.05)
    raise DaemonError(f"no pid file {pidfile} after {timeout:.0f} s")


def wait_ready(daemon: PrivateDaemon, timeout: float) -> None:
    """Until the daemon answers on its socket (it probes QEMU's capabilities first)."""
    import libvirt

    deadline = time.monotonic() + timeout
    last = "its socket never appeared"
    while time.monotonic() < deadline:
        if not daemon.alive():
            raise DaemonError(
                f"libvirtd (pid {daemon.libvirtd_pid}) exited while starting\n{daemon.log_tail()}"
            )
        if daemon.socket.exists():
            try:
                conn = libvirt.open(daemon.uri)
                conn.close()
                return
            except libvirt.libvirtError as exc:
                last = str(exc)
        time.sleep(0.1)
    raise Timeout(
        f"the private libvirtd did not answer within {timeout:.0f} s ({last})\n{daemon.log_tail()}"
    )


def process_name(pid: int) -> str | None:
    """The name of live process `pid`; None when it is gone or a zombie (daemons are
    reparented to PID 1, which may reap them only seconds after they exit)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    name, _, rest = stat.partition("(")[2].rpartition(")")
    return None if rest.split()[0] == "Z" else name


def _is_process(pid: int, comm: str) -> bool:
    return process_name(pid) == comm


def _terminate(pid: int, comm: str, timeout: float = 3.0) -> bool:
    """SIGTERM, then SIGKILL after `timeout`; True when a process was stopped."""
    if not _is_process(pid, comm):
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _is_process(pid, comm):
            return True
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    return True


def stop(cluster: str) -> bool:
    """Stop the cluster's daemons (found by their pid files) and remove the run folder.

    True when something was stopped or removed. Guests and dnsmasq are not stopped here: the
    caller destroys them through libvirt first, and whatever is left in the namespace after that
    is killed with the namespace.
    """
    run_dir = run_dir_for(cluster)
    did = False
    for comm in ("libvirtd", "virtlogd"):
        pidfile = run_dir / f"{comm}.pid"
        try:
            pid = int(pidfile.read_text().strip())
        except (FileNotFoundError, ValueError):
            continue
        did |= _terminate(pid, comm)
    if run_dir.exists():
        shutil.rmtree(run_dir, ignore_errors=True)
        did = True
    return did
