"""SSH to the cluster's VMs: paramiko over a socket made inside the cluster's network namespace.

Host keys are pinned: each VM's public host key is written into the cluster's own known_hosts at
`up`, before the VM boots, and a connection whose key differs or is absent is refused
(`RejectPolicy`; the user's ~/.ssh/known_hosts is never read or written). Only transient
connection failures (refused, unreachable, timed out, no banner yet) are retried, until a deadline.
Commands are argv lists quoted with shlex; every exit status is read.
"""

from __future__ import annotations

import codecs
import collections
import shlex
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import paramiko

from orchestrator import netns
from orchestrator.errors import RemoteError, Timeout
from orchestrator.ui import log

if TYPE_CHECKING:
    from orchestrator.state import ClusterState, VmState

PID_MARK = "gcvm-pgid:"
USER = "root"
OUTPUT_GRACE_S = 5.0  # after the exit status, how long output may still come
TAIL_LINES = 200


class HostKeyMismatch(RemoteError):
    pass


@dataclass(frozen=True)
class Result:
    rc: int
    stdout: str
    stderr: str


@dataclass(frozen=True)
class Endpoint:
    """Where and how to reach one VM."""

    name: str  # for messages
    host: str
    port: int
    netns: str | None
    client_key: Path
    known_hosts: Path
    user: str = USER


def _is_transient(exc: BaseException) -> bool:
    if isinstance(exc, paramiko.BadHostKeyException | paramiko.AuthenticationException):
        return False
    if isinstance(exc, paramiko.SSHException):
        return "known_hosts" not in str(exc)
    return isinstance(exc, OSError | EOFError | socket.timeout)


def command_line(argv: list[str], env: dict[str, str] | None = None) -> str:
    """The shell line sshd runs: argv quoted, env set through env(1) (no AcceptEnv needed)."""
    if not argv:
        raise ValueError("empty argv")
    prefix = ["env", *(f"{k}={v}" for k, v in env.items())] if env else []
    return shlex.join(prefix + list(argv))


class RemoteProcess:
    """A command running on a VM; output is read by a thread and handed to `on_line`."""

    def __init__(
        self,
        remote: Remote,
        command: str,
        channel: paramiko.Channel,
        on_line: Callable[[str], None] | None,
    ) -> None:
        self.remote = remote
        self.command = command
        self._chan = channel
        self._on_line = on_line
        self._out: list[str] = []
        self._err: list[str] = []
        self._tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self._pgid: int | None = None
        self._rc: int | None = None
        self._pgid_seen = threading.Event()
        self._thread = threading.Thread(target=self._pump, daemon=True, name=f"ssh-{remote.name}")
        self._thread.start()

    def _emit(self, line: str, stream: list[str]) -> None:
        if stream is self._out and self._pgid is None and line.startswith(PID_MARK):
            self._pgid = int(line[len(PID_MARK) :])
            self._pgid_seen.set()
            return
        stream.append(line + "\n")
        self._tail.append(line)
        if self._on_line is not None:
            try:
                self._on_line(line)
            except Exception:  # a broken printer must not lose the exit status
                log.exception("on_line callback failed")

    def _pump(self) -> None:
        chan = self._chan
        decoders = {
            id(self._out): codecs.getincrementaldecoder("utf-8")("replace"),
            id(self._err): codecs.getincrementaldecoder("utf-8")("replace"),
        }
        partial = {id(self._out): "", id(self._err): ""}

        def feed(data: bytes, stream: list[str], final: bool = False) -> None:
            text = partial[id(stream)] + decoders[id(stream)].decode(data, final)
            *lines, rest = text.split("\n")
            for line in lines:
                self._emit(line.rstrip("\r"), stream)
            partial[id(stream)] = rest
            if final and rest:
                self._emit(rest, stream)

        exited_at: float | None = None
        try:
            while True:
                busy = False
                if chan.recv_ready():
                    feed(chan.recv(65536), self._out)
                    busy = True
                if chan.recv_stderr_ready():
                    feed(chan.recv_stderr(65536), self._err)
                    busy = True
                if busy:
                    continue
                drained = not chan.recv_ready() and not chan.recv_stderr_ready()
                if drained and (chan.closed or (chan.eof_received and chan.exit_status_ready())):
                    break
                # sshd may send the exit status before the last of the output: read on until
                # the output's end, but not for ever (a child left holding it open)
                if chan.exit_status_ready():
                    exited_at = time.monotonic() if exited_at is None else exited_at
                    if drained and time.monotonic() - exited_at > OUTPUT_GRACE_S:
                        break
                time.sleep(0.02)
            feed(b"", self._out, final=True)
            feed(b"", self._err, final=True)
            self._rc = chan.recv_exit_status() if chan.exit_status_ready() else -1
        except Exception as exc:  # the connection died under us
            log.debug("%s: reading output failed: %s", self.remote.name, exc)
            self._rc = -1
        finally:
            self._pgid_seen.set()

    def poll(self) -> int | None:
        return None if self._thread.is_alive() else self._rc

    def wait(self, timeout: float) -> int:
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise Timeout(
                f"{self.remote.name}: `{self.command}` still running after {timeout:.0f} s",
                hint="the command was left running; see its output",
            )
        assert self._rc is not None
        return self._rc

    def kill(self) -> None:
        """Kill the remote process group, then close the channel."""
        self._pgid_seen.wait(5)
        if self._pgid is not None and self.poll() is None:
            # `kill -SIG -PGID` (no `--`): dash, the guests' sh, rejects `--` there
            script = (
                f"kill -TERM -{self._pgid} 2>/dev/null; sleep 1; "
                f"kill -KILL -{self._pgid} 2>/dev/null; true"
            )
            try:
                self.remote._exec(script).recv_exit_status()
            except Exception as exc:
                log.debug("%s: kill failed: %s", self.remote.name, exc)
        self._chan.close()
        self._thread.join(5)

    def tail(self, n: int = 20) -> list[str]:
        return list(self._tail)[-n:]

    @property
    def stdout(self) -> str:
        return "".join(self._out)

    @property
    def stderr(self) -> str:
        return "".join(self._err)


class Remote:
    """One SSH connection to one VM."""

    def __init__(self, endpoint: Endpoint, client: paramiko.SSHClient) -> None:
        self.endpoint = endpoint
        self.name = endpoint.name
        self._client = client

    @classmethod
    def connect(cls, cluster: ClusterState, vm: VmState, timeout: float) -> Remote:
        """SSH to `vm`; a locked master has no SSH server, and gcvm does not try."""
        _refuse_locked(vm)
        return cls.open(endpoint_for(cluster, vm), timeout)

    @classmethod
    def open(cls, endpoint: Endpoint, timeout: float) -> Remote:
        """Connect, retrying transient failures until `timeout` seconds have passed."""
        deadline = time.monotonic() + timeout
        attempt = 0
        while True:
            attempt += 1
            left = deadline - time.monotonic()
            try:
                return cls(endpoint, _connect_once(endpoint, max(1.0, min(10.0, left))))
            except paramiko.BadHostKeyException as exc:
                raise HostKeyMismatch(
                    f"{endpoint.name} ({endpoint.host}) presented a host key that differs from "
                    f"the one pinned in {endpoint.known_hosts}: {exc}",
                    hint="someone else answers at that address, or the VM was replaced; "
                    "recreate the cluster",
                ) from None
            except paramiko.AuthenticationException as exc:
                raise RemoteError(
                    f"{endpoint.name} ({endpoint.host}) refused the cluster's key "
                    f"{endpoint.client_key}: {exc}"
                ) from None
            except Exception as exc:
                if not _is_transient(exc):
                    raise RemoteError(
                        f"cannot connect to {endpoint.name} ({endpoint.host}): {exc}"
                    ) from None
                if time.monotonic() + 1 >= deadline:
                    raise Timeout(
                        f"{endpoint.name} ({endpoint.host}:{endpoint.port}) not "
                        f"reachable over SSH within {timeout:.0f} s ({attempt} tries; "
                        f"last: {type(exc).__name__}: {exc})"
                    ) from None
                log.debug("%s: connect try %d failed: %s", endpoint.name, attempt, exc)
                time.sleep(1.0)

    def _exec(self, command: str) -> paramiko.Channel:
        transport = self._client.get_transport()
        if transport is None or not transport.is_active():
            raise RemoteError(f"the SSH connection to {self.name} is closed")
        chan = transport.open_session()
        chan.exec_command(command)
        return chan

    def start(
        self,
        argv: list[str],
        env: dict[str, str] | None = None,
        on_line: Callable[[str], None] | None = None,
    ) -> RemoteProcess:
        """Start a command; its first output line (not handed on) names its process group."""
        command = command_line(argv, env)
        log.debug("%s: run %s", self.name, command)
        chan = self._exec(f"echo {PID_MARK}$$; exec {command}")
        return RemoteProcess(self, command, chan, on_line)

    def run(
        self,
        argv: list[str],
        *,
        timeout: float,
        env: dict[str, str] | None = None,
        check: bool = True,
        on_line: Callable[[str], None] | None = None,
    ) -> Result:
        proc = self.start(argv, env, on_line)
        try:
            rc = proc.wait(timeout)
        except Timeout:
            proc.kill()
            raise Timeout(
                f"{self.name}: `{proc.command}` did not finish within {timeout:.0f} s",
                hint="last output:\n" + "\n".join(proc.tail(10)),
            ) from None
        result = Result(rc, proc.stdout, proc.stderr)
        log.debug("%s: exit %d: %s", self.name, rc, proc.command)
        if check and rc != 0:
            tail = "\n".join(f"    {line}" for line in result.stderr.splitlines()[-10:])
            raise RemoteError(
                f"{self.name}: `{proc.command}` exited with status {rc}"
                + (f"; stderr:\n{tail}" if tail else "")
            )
        return result

    def put(self, local: Path, remote: str,
            progress: Callable[[int, int], None] | None = None) -> None:  # fmt: skip
        try:
            with self._client.open_sftp() as sftp:
                sftp.put(str(local), remote, callback=progress)
        except (OSError, paramiko.SSHException) as exc:
            raise RemoteError(f"{self.name}: cannot copy {local} to {remote}: {exc}") from None

    def get(self, remote: str, local: Path) -> None:
        local.parent.mkdir(parents=True, exist_ok=True)
        try:
            with self._client.open_sftp() as sftp:
                sftp.get(remote, str(local))
        except (OSError, paramiko.SSHException) as exc:
            raise RemoteError(f"{self.name}: cannot copy {remote} to {local}: {exc}") from None

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> Remote:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _connect_once(ep: Endpoint, timeout: float) -> paramiko.SSHClient:
    sock = netns.connect_tcp(ep.netns, ep.host, ep.port, timeout)
    client = paramiko.SSHClient()
    client.load_host_keys(str(ep.known_hosts))  # the cluster's own file, nothing else
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    try:
        client.connect(
            ep.host,
            port=ep.port,
            username=ep.user,
            key_filename=str(ep.client_key),
            sock=sock,
            timeout=timeout,
            banner_timeout=timeout,
            auth_timeout=timeout,
            allow_agent=False,
            look_for_keys=False,
        )
    except BaseException:
        client.close()
        sock.close()
        raise
    transport = client.get_transport()
    if transport is not None:
        transport.set_keepalive(15)
    return client


def _refuse_locked(vm: VmState) -> None:
    """A locked master has no SSH server, and gcvm does not try."""
    if vm.locked:
        from orchestrator.agentclient import refuse

        raise refuse(vm.name, "the host has no way in")


def endpoint_for(cluster: ClusterState, vm: VmState) -> Endpoint:
    return Endpoint(
        name=vm.name,
        host=vm.address,
        port=22,
        netns=cluster.netns,
        client_key=cluster.client_key,
        known_hosts=cluster.known_hosts,
    )


def ssh_argv(cluster: ClusterState, vm: VmState, command: list[str] | None = None) -> list[str]:
    """OpenSSH's client with the same pinning, inside the namespace (for interactive shells)."""
    _refuse_locked(vm)
    argv = [
        "ssh",
        "-i",
        str(cluster.client_key),
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        f"UserKnownHostsFile={cluster.known_hosts}",
        "-o",
        "GlobalKnownHostsFile=/dev/null",
        "-o",
        "StrictHostKeyChecking=yes",
        "-o",
        "BatchMode=yes",
        f"{USER}@{vm.address}",
    ]
    if command:
        argv += ["--", shlex.join(command)]
    return netns.exec_argv(cluster.netns, argv)
