"""Fixtures for tests that boot real VMs.

`vm_host` decides whether this host can boot them (root, QEMU, libvirt's daemons, network
namespaces) and skips with the precise reason when it cannot, except under CI=true, where a host
that cannot is a failure. `built_image` is gcvm's guest image, built once when missing.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from orchestrator import image as image_mod
from orchestrator import netns, paths, privatelibvirt, state
from orchestrator.errors import ImageMissing
from orchestrator.image import Image

IN_CI = os.environ.get("CI", "").lower() == "true"
TOOLS = ("qemu-system-x86_64", "qemu-img", "libvirtd", "virtlogd", "ip", "unshare")


def unavailable(reason: str) -> None:
    """Skip outside CI; in CI the host must be able to run VM tests."""
    if IN_CI:
        pytest.fail(f"CI=true but this host cannot boot VMs: {reason}")
    pytest.skip(f"this host cannot boot VMs: {reason}")


def vm_host_problem() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespace, private libvirtd)"
    for tool in TOOLS:
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (scripts/install-system-deps.sh installs it)"
    proc = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    if proc.returncode != 0:
        return f"`ip netns` does not work here: {proc.stderr.strip()}"
    return None


@pytest.fixture(scope="session")
def vm_host() -> None:
    problem = vm_host_problem()
    if problem:
        unavailable(problem)


@pytest.fixture(scope="session")
def built_image(vm_host: None) -> image_mod.Image:
    try:
        return image_mod.find_image()
    except ImageMissing:
        return image_mod.build_image()


@dataclass(frozen=True)
class Env:
    home: Path
    env: dict[str, str]

    def gcvm(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "orchestrator", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )


@pytest.fixture
def gcvm_env(monkeypatch: pytest.MonkeyPatch, built_image: Image) -> Iterator[Env]:
    # State goes to a private GCVM_HOME; the image (and libvirt's capability cache) stay shared.
    # QEMU runs as libvirt-qemu: the home must sit where others can search (pytest's tmp_path
    # is under a 0700 folder), so it is made under /var/tmp and removed afterwards.
    cache = os.environ.get("GCVM_CACHE") or str(paths.cache_root())
    home = Path(tempfile.mkdtemp(prefix="gcvm-it-", dir="/var/tmp"))
    os.chmod(home, 0o755)
    monkeypatch.setenv("GCVM_HOME", str(home))
    monkeypatch.setenv("GCVM_CACHE", cache)
    try:
        yield Env(home, {**os.environ, "GCVM_HOME": str(home), "GCVM_CACHE": cache})
    finally:
        shutil.rmtree(home, ignore_errors=True)


def cluster_name() -> str:
    return f"it{uuid.uuid4().hex[:6]}"


def processes_mentioning(text: str) -> list[str]:
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline and "pytest" not in cmdline:
            found.append(f"{proc.name}: {cmdline.strip()}")
    return found


def qemu_uids(name: str) -> dict[str, int]:
    """The real uid of each of the cluster's QEMU processes (`-name guest=NAME-...`)."""
    uids = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            status = (proc / "status").read_text()
        except OSError:
            continue
        if not argv or b"qemu-system" not in argv[0]:
            continue
        guest = next((a for a in argv if a.startswith(b"guest=" + name.encode() + b"-")), None)
        if guest is None:
            continue
        uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
        vm = guest.split(b",")[0].decode().removeprefix("guest=")
        uids[vm] = int(uid_line.split()[1])
    return uids


def host_leftovers(name: str) -> list[str]:
    """Everything a cluster can leave on this host, in words; [] when nothing is left.

    Domains and leases live in the private daemon's folders and processes (the cluster folder,
    /run/gcvm/NAME, QEMU and dnsmasq naming the cluster); the namespace, the daemons, any host
    worker of gcvm (an `up` or `run` still running), mounts, the state and its lock file."""
    found = []
    if netns.exists(f"gcvm-{name}"):
        found.append(f"namespace gcvm-{name}")
    cdir = state.cluster_dir(name)
    if cdir.exists():
        inside = sorted(str(p.relative_to(cdir)) for p in cdir.rglob("*"))[:8]
        found.append(f"cluster folder {cdir} (state, overlays, seeds, leases): {inside}")
    if state.lock_path(name).exists():
        found.append(f"lock file {state.lock_path(name)}")
    if privatelibvirt.run_dir_for(name).exists():
        found.append(f"daemon run folder {privatelibvirt.run_dir_for(name)}")
    # qemu (-name guest=NAME-...), libvirtd/virtlogd (-p /run/gcvm/NAME/...), dnsmasq
    # (.../dnsmasq/gcvm-NAME.conf) and gcvm itself (--name NAME) all name the cluster
    found += [f"process {p}" for p in processes_mentioning(name)]
    with open("/proc/self/mountinfo") as mounts:
        found += [f"mount {line.split()[4]}" for line in mounts if f"/{name}/" in line]
    return found


def assert_nothing_left(name: str) -> None:
    left = host_leftovers(name)
    assert left == [], f"cluster {name} left: {left}"


class Running:
    """A gcvm command in the background whose stderr is read line by line as it comes."""

    def __init__(self, env: Env, *args: str, session: bool = False) -> None:
        # session: a process group of its own, which `signal_group` signals as a terminal's
        # Ctrl-C does (gcvm and every child it runs in the foreground)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "orchestrator", *args],
            env=env.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=session,
        )
        self.lines: list[str] = []
        self._seen = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._seen:
                self.lines.append(line)
                self._seen.notify_all()
        with self._seen:
            self._seen.notify_all()

    @property
    def text(self) -> str:
        return " ".join("".join(self.lines).split())

    def wait_for(self, pattern: str, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        with self._seen:
            while not re.search(pattern, self.text):
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    raise AssertionError(f"never saw {pattern!r}; stderr so far:\n{self.text}")
                self._seen.wait(timeout=min(left, 0.5))

    def signal(self, signum: int) -> None:
        os.kill(self.proc.pid, signum)

    def signal_group(self, signum: int) -> None:
        os.killpg(self.proc.pid, signum)

    def finish(self, timeout: float = 240) -> int:
        rc = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return rc
