"""Linux network namespaces: create and delete them, and open TCP connections inside one.

A network namespace is a property of a thread, not of a process. `call_in` runs a function in a
short-lived thread that first joins the namespace with setns(2); a socket created there belongs to
that namespace for its whole life, so the caller can hand it to paramiko from any thread and every
packet stays inside the namespace.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import socket
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from orchestrator.errors import GcvmError, HostUnsupported
from orchestrator.ui import log

CLONE_NEWNET = 0x40000000
NETNS_DIR = Path("/run/netns")
T = TypeVar("T")


class NetnsError(GcvmError):
    pass


def path(name: str) -> Path:
    return NETNS_DIR / name


def exists(name: str) -> bool:
    return path(name).exists()


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    argv = ["ip", *args]
    log.debug("run: %s", " ".join(argv))
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        raise HostUnsupported(
            "`ip` (iproute2) is not installed", hint="apt-get install iproute2"
        ) from None
    if check and proc.returncode != 0:
        raise NetnsError(
            f"`{' '.join(argv)}` failed: {proc.stderr.strip()}",
            hint="network namespaces need root (CAP_SYS_ADMIN)",
        )
    return proc


def create(name: str) -> None:
    """Create the namespace (if absent) with its loopback up."""
    if not exists(name):
        _ip("netns", "add", name)
    _ip("-n", name, "link", "set", "lo", "up")


def pids(name: str) -> list[int]:
    """Processes whose network namespace is `name` (what `ip netns pids` reports)."""
    if not exists(name):
        return []
    proc = _ip("netns", "pids", name, check=False)
    return sorted(int(p) for p in proc.stdout.split() if p.isdigit())


def delete(name: str) -> bool:
    """Delete the namespace; True when there was one."""
    if not exists(name):
        return False
    _ip("netns", "delete", name)
    return True


def exec_argv(name: str | None, argv: list[str]) -> list[str]:
    """`argv` run inside the namespace (unchanged when `name` is None)."""
    return argv if name is None else ["ip", "netns", "exec", name, *argv]


def _setns(name: str) -> None:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    fd = os.open(path(name), os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise NetnsError(
                f"cannot enter network namespace {name}: {os.strerror(err)}",
                hint="entering a namespace needs root" if err == errno.EPERM else None,
            )
    finally:
        os.close(fd)


def call_in(name: str | None, fn: Callable[[], T]) -> T:
    """Run `fn` in a fresh thread that joined network namespace `name` (or directly if None)."""
    if name is None:
        return fn()
    if not exists(name):
        raise NetnsError(
            f"network namespace {name} does not exist",
            hint="the cluster's daemon is gone; `gcvm down` cleans up what is left",
        )
    result: list[T] = []
    error: list[BaseException] = []

    def body() -> None:
        try:
            _setns(name)
            result.append(fn())
        except BaseException as exc:  # handed to the calling thread
            error.append(exc)

    thread = threading.Thread(target=body, name=f"netns-{name}", daemon=True)
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


def connect_tcp(name: str | None, host: str, port: int, timeout: float) -> socket.socket:
    """A TCP socket created and connected inside namespace `name`."""

    def connect() -> socket.socket:
        return socket.create_connection((host, port), timeout=timeout)

    return call_in(name, connect)


def listen_tcp(name: str | None, host: str, port: int = 0) -> socket.socket:
    """A listening TCP socket bound inside namespace `name` (port 0: any free port)."""

    def bind() -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(16)
        return sock

    return call_in(name, bind)
