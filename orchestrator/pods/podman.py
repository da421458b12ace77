"""podman for the pods runtime: a private configuration per cluster, every command inside the
cluster's network namespace, and the container image made offline from the guest image.

Facts this follows (podman 4.3.1, Debian 12, no systemd; measured): crun cannot run with hybrid
cgroups, so the runtime is runc; no systemd, so cgroupfs and a file events log; podman lowers its
own NPROC, so the default ulimits are set explicitly. Every file podman writes for a cluster
(configuration, container storage, run state, CNI network files) lives under the cluster's
state folder, and every podman command runs as `nsenter --net=/run/netns/NS podman ...`, so the
pods' bridge, addresses and traffic stay in that namespace (`nsenter` rather than `ip netns
exec`, so podman's own namespace bind mounts stay visible to later commands). What podman still
writes outside: a lock and its package's default under /etc/cni/net.d, CNI leases under
/var/lib/cni/networks/<network> (removed by `down`), /var/lib/containers/cache, and
/run/netns/netns-<id> while a pod runs.

The image: the guest image's root filesystem (its qcow2 disk holds one ext4 filesystem) is read
without mounting anything (`qemu-img convert` to raw, `debugfs rdump`), streamed through tar into
`podman import`, once per image recipe, into an image store under gcvm's cache that each
cluster's podman reads (`additionalimagestores`, read-only). debugfs keeps owners and modes but
not setuid/setgid/sticky bits: /tmp's sticky bit is put back; nothing in a pod runs setuid
programs (the ranks run as root in their container).
"""

from __future__ import annotations

import contextlib
import fcntl
import shutil
import signal
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO

from orchestrator import netns, ui
from orchestrator.errors import GcvmError, HostUnsupported
from orchestrator.paths import cache_root
from orchestrator.ui import log

TOOLS = {"podman": "podman", "runc": "runc", "nsenter": "util-linux", "debugfs": "e2fsprogs",
         "qemu-img": "qemu-utils", "tar": "tar"}  # fmt: skip
IMAGE_REPO = "localhost/gcvm-guest"
GUEST_PATH = "/opt/gcvm/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DONE = "complete"


class PodmanError(GcvmError):
    pass


def check_tools() -> None:
    missing = [pkg for tool, pkg in TOOLS.items() if shutil.which(tool) is None]
    if missing:
        raise HostUnsupported(
            f"the pods runtime needs {', '.join(sorted(set(missing)))}",
            hint=f"apt-get install {' '.join(sorted(set(missing)))} "
            "(scripts/install-system-deps.sh installs them)",
        )


def containers_conf(root: Path) -> str:
    return (
        "[containers]\n"
        'default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]\n'
        "[engine]\n"
        'runtime = "runc"\n'
        'cgroup_manager = "cgroupfs"\n'
        'events_logger = "file"\n'
        f'events_logfile_path = "{root / "events.log"}"\n'
        f'tmp_dir = "{root / "tmp"}"\n'
        "[network]\n"
        'network_backend = "cni"\n'
        f'network_config_dir = "{root / "cni"}"\n'
    )


def storage_conf(root: Path, image_stores: Sequence[Path] = ()) -> str:
    text = (
        "[storage]\n"
        'driver = "overlay"\n'
        f'runroot = "{root / "run"}"\n'
        f'graphroot = "{root / "storage"}"\n'
    )
    if image_stores:
        stores = ", ".join(f'"{p}"' for p in image_stores)
        text += f"[storage.options]\nadditionalimagestores = [{stores}]\n"
    return text


class Podman:
    """podman with the configuration under `root`, inside network namespace `ns` (None: the
    calling process's own, for commands that touch no network: image import)."""

    def __init__(self, root: Path, ns: str | None, image_stores: Sequence[Path] = ()) -> None:
        self.root = root
        self.ns = ns
        self.image_stores = tuple(image_stores)

    def write_config(self) -> None:
        for sub in ("cni", "tmp", "run", "storage"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        (self.root / "containers.conf").write_text(containers_conf(self.root))
        (self.root / "storage.conf").write_text(storage_conf(self.root, self.image_stores))
        (self.root / "registries.conf").write_text("unqualified-search-registries = []\n")

    @property
    def env(self) -> dict[str, str]:
        return {
            "CONTAINERS_CONF": str(self.root / "containers.conf"),
            "CONTAINERS_STORAGE_CONF": str(self.root / "storage.conf"),
            "CONTAINERS_REGISTRIES_CONF": str(self.root / "registries.conf"),
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": str(self.root),
        }

    def argv(self, args: Sequence[str]) -> list[str]:
        base = ["podman", *args]
        return base if self.ns is None else ["nsenter", f"--net={netns.path(self.ns)}", *base]

    def run(self, *args: str, timeout: float = 120, check: bool = True,
            stdin: int | None = None) -> subprocess.CompletedProcess[str]:  # fmt: skip
        argv = self.argv(args)
        log.debug("run: %s", " ".join(argv))
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                                  env=self.env, stdin=stdin)  # fmt: skip
        except subprocess.TimeoutExpired:
            raise PodmanError(f"`podman {' '.join(args[:3])}` took over {timeout:.0f} s") from None
        if check and proc.returncode < 0:  # podman itself killed (OOM, an operator's kill)
            raise PodmanError(
                f"`podman {' '.join(args[:3])}` was killed by "
                f"{signal.Signals(-proc.returncode).name}",
                hint="something on the host killed podman (the OOM killer? see `dmesg`); "
                "run the command again",
            )  # fmt: skip
        if check and proc.returncode != 0:
            tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
            raise PodmanError(f"`podman {' '.join(args[:4])}` failed: {tail}")
        return proc

    def popen(self, *args: str, stdout: int | IO[bytes] | None,
              stderr: int | IO[bytes] | None) -> subprocess.Popen[bytes]:  # fmt: skip
        argv = self.argv(args)
        log.debug("start: %s", " ".join(argv))
        return subprocess.Popen(argv, env=self.env, stdout=stdout, stderr=stderr,
                                stdin=subprocess.DEVNULL)  # fmt: skip


# --------------------------------------------------------------------------------------------
# The image


def image_tag(recipe: str) -> str:
    return f"{IMAGE_REPO}:{recipe}"


def image_store(recipe: str) -> Path:
    return cache_root() / "pods" / recipe


def image_storage(store: Path) -> Path:
    """The folder a cluster's podman names in `additionalimagestores`."""
    return store / "storage"


@contextlib.contextmanager
def _cache_lock() -> Iterator[None]:
    folder = cache_root() / "pods"
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def ensure_image(disk: Path, recipe: str, timeout: float = 900) -> Path:
    """The image store holding `image_tag(recipe)`, made from the guest image's disk once."""
    store = image_store(recipe)
    with _cache_lock():
        if (store / DONE).exists():
            return store
        shutil.rmtree(store, ignore_errors=True)
        work = store.parent / f"{recipe}.work"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        try:
            with ui.step(f"make the container image {image_tag(recipe)} from {disk.name}"):
                _import(disk, recipe, work, store, timeout)
        except BaseException:
            shutil.rmtree(store, ignore_errors=True)
            raise
        finally:
            shutil.rmtree(work, ignore_errors=True)
        (store / DONE).write_text(image_tag(recipe) + "\n")
    return store


def _import(disk: Path, recipe: str, work: Path, store: Path, timeout: float) -> None:
    raw, tree = work / "root.raw", work / "tree"
    tree.mkdir()
    _tool(["qemu-img", "convert", "-O", "raw", str(disk), str(raw)], timeout)
    # debugfs prints its banner on stderr and reports a failed rdump only there
    proc = _tool(["debugfs", "-R", f"rdump / {tree}", str(raw)], timeout)
    if not (tree / "opt" / "gcvm" / "venv" / "bin" / "python").exists():
        raise PodmanError(f"debugfs read no guest venv from {disk}: {proc.stderr.strip()[-300:]}")
    raw.unlink()
    (tree / "tmp").chmod(0o1777)
    podman = Podman(store, None)
    podman.write_config()
    tar = subprocess.Popen(["tar", "-C", str(tree), "--numeric-owner", "-c", "."],
                           stdout=subprocess.PIPE)  # fmt: skip
    try:
        podman.run("import", "--change", f"ENV PATH={GUEST_PATH}", "--change",
                   'CMD ["sleep", "infinity"]', "-", image_tag(recipe), timeout=timeout,
                   stdin=tar.stdout.fileno() if tar.stdout else None)  # fmt: skip
    finally:
        if tar.stdout:
            tar.stdout.close()
        tar.wait()
    # the store is only read from now on: its run state and configuration are not needed
    for sub in ("run", "tmp", "cni"):
        shutil.rmtree(store / sub, ignore_errors=True)


def _tool(argv: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    log.debug("run: %s", " ".join(argv))
    proc = subprocess.run(["nice", *argv], capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise PodmanError(f"`{' '.join(argv[:2])}` failed: {proc.stderr.strip()[-300:]}")
    return proc
