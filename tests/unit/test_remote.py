"""The SSH layer against a real SSH server (paramiko's server side) that runs commands locally.

The server listens on loopback, or inside a network namespace the test creates, so the same tests
cover the plain path and the setns path; host keys are pinned through a known_hosts file.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import paramiko
import pytest

from orchestrator import keys, netns, remote
from orchestrator.errors import RemoteError, Timeout
from orchestrator.remote import Endpoint, HostKeyMismatch, Remote, command_line


class _Server(paramiko.ServerInterface):
    def __init__(self, authorized: paramiko.PKey) -> None:
        self.authorized = authorized

    def check_auth_publickey(self, username: str, key: paramiko.PKey) -> int:
        ok = username == "root" and key.get_base64() == self.authorized.get_base64()
        return paramiko.AUTH_SUCCESSFUL if ok else paramiko.AUTH_FAILED

    def get_allowed_auths(self, username: str) -> str:
        return "publickey"

    def check_channel_request(self, kind: str, chanid: int) -> int:
        return (
            paramiko.OPEN_SUCCEEDED
            if kind == "session"
            else paramiko.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED
        )

    def check_channel_exec_request(self, channel: paramiko.Channel, command: bytes) -> bool:
        threading.Thread(target=_execute, args=(channel, command.decode()), daemon=True).start()
        return True

    def check_channel_subsystem_request(self, channel: paramiko.Channel, name: str) -> bool:
        return bool(super().check_channel_subsystem_request(channel, name))


class _LocalSftp(paramiko.SFTPServerInterface):
    """Files of this host, as sshd's sftp-server serves them (only what put/get use)."""

    def open(self, path: str, flags: int, attr: paramiko.SFTPAttributes) -> object:
        try:
            fd = os.open(path, flags | getattr(os, "O_BINARY", 0), 0o644)
        except OSError as exc:
            return paramiko.SFTPServer.convert_errno(exc.errno)
        mode = "wb" if flags & os.O_WRONLY else "r+b" if flags & os.O_RDWR else "rb"
        handle = paramiko.SFTPHandle(flags)
        handle.filename = path  # type: ignore[attr-defined]
        f = os.fdopen(fd, mode)
        handle.readfile = f  # type: ignore[attr-defined]
        handle.writefile = f  # type: ignore[attr-defined]
        return handle

    def stat(self, path: str) -> object:
        try:
            return paramiko.SFTPAttributes.from_stat(os.stat(path))
        except OSError as exc:
            return paramiko.SFTPServer.convert_errno(exc.errno)

    lstat = stat


LATE_OUTPUT = "GCVM_TEST_LATE_OUTPUT"  # in a command: the exit status goes before the output


def _execute(channel: paramiko.Channel, command: str) -> None:
    """What sshd does without a pty: the command's shell leads a new session."""
    proc = subprocess.Popen(
        ["sh", "-c", command],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )

    def pump(stream: object, send: object) -> None:
        for chunk in iter(lambda: stream.read1(4096), b""):  # type: ignore[attr-defined]
            send(chunk)  # type: ignore[operator]

    threads = [
        threading.Thread(target=pump, args=(proc.stdout, channel.sendall)),
        threading.Thread(target=pump, args=(proc.stderr, channel.sendall_stderr)),
    ]
    if LATE_OUTPUT in command:  # sshd may report the exit before the child's last output
        late = proc.stdout.read()  # type: ignore[union-attr]
        rc = proc.wait()
        threads[1].start()
        threads[1].join()
        channel.send_exit_status(rc)
        time.sleep(0.3)
        channel.sendall(late)
        channel.shutdown_write()
        channel.close()
        return
    for t in threads:
        t.start()
    rc = proc.wait()
    # as sshd: the status when the command exits, the channel's end when its output ends (a
    # child of the command may still hold it open)
    channel.send_exit_status(rc if rc >= 0 else 128 - rc)
    for t in threads:
        t.join()
    channel.shutdown_write()
    channel.close()


@dataclass
class SshServer:
    host: str
    port: int
    host_key: paramiko.Ed25519Key
    host_public: str
    client_key: Path
    known_hosts: Path
    netns: str | None

    def endpoint(self, known_hosts: Path | None = None) -> Endpoint:
        return Endpoint(
            name="vm0",
            host=self.host,
            port=self.port,
            netns=self.netns,
            client_key=self.client_key,
            known_hosts=known_hosts or self.known_hosts,
        )


def _serve(
    listener: socket.socket,
    host_key: paramiko.PKey,
    authorized: paramiko.PKey,
    stop: threading.Event,
) -> None:
    listener.settimeout(0.2)
    while not stop.is_set():
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            continue
        except OSError:
            return
        transport = paramiko.Transport(conn)
        transport.add_server_key(host_key)
        transport.set_subsystem_handler("sftp", paramiko.SFTPServer, _LocalSftp)
        try:
            transport.start_server(server=_Server(authorized))
        except (paramiko.SSHException, OSError, EOFError):
            continue  # the client gave up during the handshake (a refused host key)


def _keypair(tmp: Path, name: str) -> tuple[keys.KeyPair, paramiko.Ed25519Key]:
    pair = keys.generate_ed25519(name)
    keys.write_keypair(pair, tmp / name)
    return pair, paramiko.Ed25519Key.from_private_key_file(str(tmp / name))


def _start(tmp: Path, ns: str | None) -> Iterator[SshServer]:
    host_pair, host_key = _keypair(tmp, "host")
    _client_pair, client_key = _keypair(tmp, "client")
    listener = netns.listen_tcp(ns, "127.0.0.1")
    port = listener.getsockname()[1]
    known = tmp / "known_hosts"
    keys.write_known_hosts(known, {"127.0.0.1": host_pair.public_openssh}, port=port)
    stop = threading.Event()
    thread = threading.Thread(
        target=_serve, args=(listener, host_key, client_key, stop), daemon=True
    )
    thread.start()
    try:
        yield SshServer(
            "127.0.0.1", port, host_key, host_pair.public_openssh, tmp / "client", known, ns
        )
    finally:
        stop.set()
        listener.close()
        thread.join(2)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[SshServer]:
    yield from _start(tmp_path, None)


def _can_netns() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2 (`ip`) is not installed"
    return None


@pytest.fixture
def ns_server(tmp_path: Path) -> Iterator[SshServer]:
    reason = _can_netns()
    if reason:
        pytest.skip(reason)
    name = f"gcvm-t{uuid.uuid4().hex[:8]}"
    netns.create(name)
    try:
        yield from _start(tmp_path, name)
    finally:
        netns.delete(name)


def test_command_line_quotes_argv_and_env() -> None:
    line = command_line(["echo", "a b", "$HOME", "it's"], env={"X": "1 2"})
    assert line == "env 'X=1 2' echo 'a b' '$HOME' 'it'\"'\"'s'"


def test_run_returns_output_and_status(server: SshServer) -> None:
    with Remote.open(server.endpoint(), timeout=10) as r:
        res = r.run(["sh", "-c", "echo out; echo err >&2; exit 3"], timeout=10, check=False)
        assert (res.rc, res.stdout, res.stderr) == (3, "out\n", "err\n")
        lines: list[str] = []
        res = r.run(
            ["printf", "%s\\n", "a b", "$HOME"], timeout=10, env={"K": "v w"}, on_line=lines.append
        )
        assert lines == ["a b", "$HOME"]
        assert r.run(["sh", "-c", 'echo "$K"'], timeout=10, env={"K": "v w"}).stdout == "v w\n"


def test_output_after_the_exit_status_is_not_lost(server: SshServer) -> None:
    """OpenSSH can send a command's exit status before the last of its output; reading must go
    on until the output's end, or a command's answer is lost (`systemctl is-system-running`
    printed nothing, its status 0, once in `gcvm up`)."""
    with Remote.open(server.endpoint(), timeout=10) as r:
        res = r.run(["sh", "-c", "echo running; exit 0"], env={LATE_OUTPUT: "1"}, timeout=10)
        assert (res.rc, res.stdout) == (0, "running\n")


def test_a_child_holding_the_output_open_delays_the_result_only_briefly(
    server: SshServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(remote, "OUTPUT_GRACE_S", 0.5)
    with Remote.open(server.endpoint(), timeout=10) as r:
        start = time.monotonic()
        res = r.run(["sh", "-c", "(sleep 5) & echo started; exit 2"], timeout=10, check=False)
        assert (res.rc, res.stdout) == (2, "started\n")
        assert time.monotonic() - start < 3


def test_run_failure_names_vm_command_and_stderr(server: SshServer) -> None:
    with Remote.open(server.endpoint(), timeout=10) as r, pytest.raises(RemoteError) as err:
        r.run(["sh", "-c", "echo boom >&2; exit 7"], timeout=10)
    assert "vm0" in str(err.value) and "status 7" in str(err.value)
    assert "boom" in str(err.value) and "exit 7" in str(err.value)


def test_run_timeout_kills_the_command(server: SshServer, tmp_path: Path) -> None:
    marker = tmp_path / "still-running"
    with Remote.open(server.endpoint(), timeout=10) as r:
        start = time.monotonic()
        with pytest.raises(Timeout):
            r.run(["sh", "-c", f"sleep 2; touch {marker}"], timeout=0.5)
        assert time.monotonic() - start < 5
    time.sleep(2.5)
    assert not marker.exists(), "the timed-out command's process group was not killed"


def test_start_wait_tail_and_kill_process_group(server: SshServer, tmp_path: Path) -> None:
    marker = tmp_path / "child-survived"
    with Remote.open(server.endpoint(), timeout=10) as r:
        proc = r.start(["sh", "-c", "for i in 1 2 3; do echo line $i; done; exit 4"])
        assert proc.wait(10) == 4
        assert proc.tail(2) == ["line 2", "line 3"]
        # a child in the background of the same group dies with it
        proc = r.start(["sh", "-c", f"(sleep 2; touch {marker}) & echo started; sleep 30"])
        deadline = time.monotonic() + 5
        while "started" not in proc.tail() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None
        proc.kill()
        assert proc.poll() is not None
    time.sleep(2.5)
    assert not marker.exists()


def test_put_and_get(server: SshServer, tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(100_000))
    remote_path = str(tmp_path / "remote.bin")
    with Remote.open(server.endpoint(), timeout=10) as r:
        r.put(src, remote_path)
        r.get(remote_path, tmp_path / "back" / "copy.bin")
    assert (tmp_path / "back" / "copy.bin").read_bytes() == src.read_bytes()


def test_wrong_pinned_host_key_is_refused(server: SshServer, tmp_path: Path) -> None:
    other = keys.generate_ed25519("other")
    wrong = tmp_path / "wrong_known_hosts"
    keys.write_known_hosts(wrong, {"127.0.0.1": other.public_openssh}, port=server.port)
    start = time.monotonic()
    with pytest.raises(HostKeyMismatch):
        Remote.open(server.endpoint(wrong), timeout=10)
    assert time.monotonic() - start < 5, "a host key mismatch must not be retried"


def test_unknown_host_is_refused_not_added(server: SshServer, tmp_path: Path) -> None:
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    with pytest.raises(RemoteError, match="known_hosts"):
        Remote.open(server.endpoint(empty), timeout=10)
    assert empty.read_text() == ""


def test_unreachable_retries_until_deadline(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: connections are refused
    ep = Endpoint("vm9", "127.0.0.1", port, None, tmp_path / "k", tmp_path / "kh")
    (tmp_path / "kh").write_text("")
    start = time.monotonic()
    with pytest.raises(Timeout, match="vm9"):
        Remote.open(ep, timeout=2.5)
    assert 1.5 < time.monotonic() - start < 6


def test_inside_a_network_namespace(ns_server: SshServer) -> None:
    """The server listens on the namespace's loopback only: reachable through setns alone."""
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", ns_server.port), timeout=2).close()
    with Remote.open(ns_server.endpoint(), timeout=10) as r:
        res = r.run(["cat", "/proc/self/net/dev"], timeout=10)
    # the command ran on this host, but the connection came through the namespace
    assert "lo:" in res.stdout
