"""The host's side of a locked master: HTTP to its job agent, over a socket made inside the
cluster's network namespace (as SSH is for the other VMs).

A locked master (`gcvm up --locked`, and every master of a `--tee tdx|sev-snp` cluster) runs
no SSH server; the agent in its measured image is the only thing listening. `LockedGuest` offers
the run verbs what they need of a master, and nothing more: package files in, one `launch` job
started, its output lines and its results file out. Everything it sends, the agent checks as
untrusted input (`groupcover/agent/jobs.py` in the guest): this client is a convenience, not a
boundary.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from orchestrator import netns
from orchestrator.errors import GcvmError, RemoteError, Timeout

PORT = 7441  # groupcover.agent.server.PORT (the guest's; a unit test checks they agree)
RESULTS_ROOT = PurePosixPath("/var/tmp/gcvm-results")  # groupcover.agent.jobs.RESULTS_ROOT
# the variables a job may set (groupcover.agent.jobs.ENV); the rest of a rank's environment is
# the agent's own, so it is not sent
JOB_ENV = frozenset({"PYTHONUNBUFFERED", "TORCH_CPP_LOG_LEVEL", "OMP_NUM_THREADS",
                     "GLOO_SOCKET_IFNAME", "TP_SOCKET_IFNAME"})  # fmt: skip
POLL_S = 0.5  # between retries of a failed request
LONG_POLL_S = 10  # the agent holds a poll this long when there is nothing new


class LockedMaster(GcvmError):
    """What the host asked needs a way into a locked master, which has none."""

    exit_code = 2


def refuse(vm_name: str, what: str) -> LockedMaster:
    return LockedMaster(
        f"{vm_name} is a locked master: {what} (no SSH, no code or commands after boot; the "
        "measured image runs only the framework's master rank through its job agent)",
        hint="`gcvm run bench` runs on it; its output and results come back with the run, its "
        "boot log is the serial console (`gcvm logs`)",
    )


class _Connection(http.client.HTTPConnection):
    def __init__(self, netns_name: str | None, host: str, port: int, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self._netns = netns_name

    def connect(self) -> None:
        self.sock = netns.connect_tcp(self._netns, self.host, self.port, self.timeout or 30)


class LockedGuest:
    """One locked master, reached through its agent."""

    def __init__(self, name: str, host: str, netns_name: str | None, port: int = PORT) -> None:
        self.name = name
        self.host = host
        self.port = port
        self.netns = netns_name

    def request(self, method: str, path: str, body: Any = None, timeout: float = 60,
                raw: bool = False) -> Any:  # fmt: skip
        conn = _Connection(self.netns, self.host, self.port, timeout)
        try:
            headers = {}
            if isinstance(body, dict):
                body = json.dumps(body).encode()
                headers["Content-Type"] = "application/json"
            if body is not None and not hasattr(body, "read"):
                headers["Content-Length"] = str(len(body))
            elif body is not None:
                headers["Content-Length"] = str(body.length)
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
        except OSError as exc:
            raise RemoteError(f"{self.name}: the agent at {self.host}:{self.port}: {exc}") from None
        finally:
            conn.close()
        if resp.status >= 300:
            try:
                said = json.loads(data).get("error", data[:200].decode(errors="replace"))
            except ValueError:
                said = data[:200].decode(errors="replace")
            raise RemoteError(f"{self.name} refused {method} {path}: {said}")
        return data if raw else json.loads(data)

    def health(self, timeout: float = 10) -> dict[str, Any]:
        return dict(self.request("GET", "/health", timeout=timeout))

    def wait_health(self, deadline: float, cancelled: Callable[[], bool] = lambda: False
                    ) -> dict[str, Any]:  # fmt: skip
        """The agent's health once it answers (the guest boots meanwhile), or Timeout."""
        last: Exception | None = None
        while time.monotonic() < deadline and not cancelled():
            try:
                return self.health(timeout=min(10.0, max(1.0, deadline - time.monotonic())))
            except (RemoteError, ValueError) as exc:
                last = exc
                time.sleep(1.0)
        raise Timeout(f"{self.name}: its agent did not answer on {self.host}:{self.port}"
                      + (f" ({last})" if last else ""))  # fmt: skip

    def put_package_file(self, package_id: str, local: Path) -> dict[str, Any]:
        with local.open("rb") as handle:
            body = _Sized(handle, local.stat().st_size)
            return dict(self.request("PUT", f"/packages/{package_id}/{local.name}", body,
                                     timeout=600))  # fmt: skip

    def start(self, argv: Sequence[str], env: dict[str, str] | None = None,
              on_line: Callable[[str], None] | None = None) -> AgentJob:  # fmt: skip
        """The master rank: argv as for SSH (`PYTHON -m groupcover launch ...`); the agent runs
        its own interpreter, so the host's part up to `-m groupcover` is dropped."""
        args = list(argv)
        if len(args) >= 3 and args[1:3] == ["-m", "groupcover"]:
            args = args[3:]
        job_env = {k: v for k, v in (env or {}).items() if k in JOB_ENV}
        number = int(self.request("POST", "/jobs", {"argv": args, "env": job_env})["id"])
        return AgentJob(self, number, on_line)

    def get(self, remote: str, local: Path) -> None:
        """A results file a job wrote (RESULTS_ROOT/RUN/NAME.json)."""
        rel = PurePosixPath(remote).relative_to(RESULTS_ROOT)
        data = self.request("GET", f"/results/{rel}", raw=True)
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_bytes(data)

    def run(self, argv: list[str], *, timeout: float, check: bool = True) -> object:
        """The agent makes a job's results folder itself; every other command is refused."""
        if argv[:2] == ["mkdir", "-p"] and all(
            PurePosixPath(a).is_relative_to(RESULTS_ROOT) for a in argv[2:]
        ):
            return None
        raise refuse(self.name, f"it runs no commands ({' '.join(argv[:3])} ...)")

    def close(self) -> None:
        pass


class _Sized:
    """A file object with a known length, for http.client's streamed body."""

    def __init__(self, handle: Any, length: int) -> None:
        self._handle = handle
        self.length = length

    def read(self, size: int = -1) -> bytes:
        return bytes(self._handle.read(size))


class AgentJob:
    """A job on a locked master, followed like a process over SSH: poll, kill, tail."""

    def __init__(self, guest: LockedGuest, number: int,
                 on_line: Callable[[str], None] | None) -> None:  # fmt: skip
        self.guest = guest
        self.number = number
        self._on_line = on_line
        self._lines: deque[str] = deque(maxlen=200)
        self._rc: int | None = None
        self._next = 0
        self._stop = threading.Event()
        self._failures = 0
        self._thread = threading.Thread(target=self._follow, daemon=True,
                                        name=f"agent-{guest.name}")  # fmt: skip
        self._thread.start()

    def _follow(self) -> None:
        while not self._stop.is_set():
            try:
                view = self.guest.request(
                    "GET", f"/jobs/{self.number}?from={self._next}&wait={LONG_POLL_S}",
                    timeout=LONG_POLL_S + 30)  # fmt: skip
                self._failures = 0
            except RemoteError as exc:
                self._failures += 1
                if self._failures >= 20:  # ten seconds of silence: the guest is gone
                    self._lines.append(f"(lost the agent: {exc})")
                    self._rc = -1
                    return
                time.sleep(POLL_S)
                continue
            for line in view["lines"]:
                self._lines.append(line)
                if self._on_line is not None:
                    self._on_line(line)
            self._next = int(view["next"])
            if view["rc"] is not None and not view["lines"]:
                self._rc = int(view["rc"])
                return

    def poll(self) -> int | None:
        return self._rc

    def wait(self, timeout: float) -> int:
        self._thread.join(timeout)
        if self._rc is None:
            raise Timeout(f"{self.guest.name}: job {self.number} still running")
        return self._rc

    def kill(self) -> None:
        with contextlib.suppress(RemoteError):
            self.guest.request("DELETE", f"/jobs/{self.number}", timeout=10)
        self._stop.set()
        if self._rc is None:
            self._rc = -9

    def tail(self, n: int = 20) -> list[str]:
        return list(self._lines)[-n:]
