"""Network namespaces: create, enter from a thread, list processes, delete (needs root)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import uuid
from collections.abc import Iterator

import pytest

from orchestrator import netns

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None,
    reason="network namespaces need root and iproute2 (`ip`)",
)


@pytest.fixture
def ns() -> Iterator[str]:
    name = f"gcvm-t{uuid.uuid4().hex[:8]}"
    netns.create(name)
    try:
        yield name
    finally:
        netns.delete(name)
    assert not netns.exists(name)


def _links(name: str | None) -> set[str]:
    return (
        {name for _, name in socket.if_nameindex()}
        if name is None
        else netns.call_in(name, lambda: {n for _, n in socket.if_nameindex()})
    )


def test_namespace_has_only_loopback_and_it_is_up(ns: str) -> None:
    assert netns.exists(ns)
    assert _links(ns) == {"lo"}
    out = subprocess.run(
        ["ip", "-n", ns, "-o", "link", "show", "lo"], capture_output=True, text=True, check=True
    ).stdout
    assert "UP" in out
    netns.create(ns)  # creating it again is harmless


def test_call_in_leaves_the_calling_thread_where_it_was(ns: str) -> None:
    before = os.readlink("/proc/thread-self/ns/net")
    inside = netns.call_in(ns, lambda: os.readlink("/proc/thread-self/ns/net"))
    assert inside != before
    assert os.readlink("/proc/thread-self/ns/net") == before
    assert inside == f"net:[{os.stat(netns.path(ns)).st_ino}]"


def test_sockets_keep_their_namespace(ns: str) -> None:
    listener = netns.listen_tcp(ns, "127.0.0.1")
    port = listener.getsockname()[1]
    try:
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
        client = netns.connect_tcp(ns, "127.0.0.1", port, timeout=2)
        server, _ = listener.accept()
        client.sendall(b"ping")
        assert server.recv(4) == b"ping"
        client.close()
        server.close()
    finally:
        listener.close()


def test_pids_and_exec_argv(ns: str) -> None:
    proc = subprocess.Popen(netns.exec_argv(ns, ["sleep", "30"]))
    try:
        for _ in range(100):
            if proc.pid in netns.pids(ns):
                break
            subprocess.run(["sleep", "0.05"])
        assert proc.pid in netns.pids(ns)
    finally:
        proc.kill()
        proc.wait()
    assert netns.exec_argv(None, ["true"]) == ["true"]


def test_missing_namespace_is_a_clear_error() -> None:
    with pytest.raises(netns.NetnsError, match="does not exist"):
        netns.call_in("gcvm-does-not-exist", lambda: None)
    assert netns.delete("gcvm-does-not-exist") is False
    assert netns.pids("gcvm-does-not-exist") == []
