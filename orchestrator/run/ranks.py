"""The running ranks: started in order, watched together, stopped together."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from orchestrator import hostworker
from orchestrator.errors import GcvmError, Timeout
from orchestrator.hostworker import HostWorkerState
from orchestrator.remote import Remote, RemoteProcess
from orchestrator.spec import Role
from orchestrator.ui import console


class RankFailed(GcvmError):
    pass


class Ranks:
    """The running ranks: started in order, watched together, stopped together."""

    def __init__(self) -> None:
        self.procs: dict[str, RemoteProcess | hostworker.Job] = {}
        self.roles: dict[str, Role] = {}

    def start(
        self, remote: Remote, vm: str, role: Role, argv: Sequence[str], env: dict[str, str] | None
    ) -> None:
        self.add(vm, role, remote.start(list(argv), env=env, on_line=printer(vm)))

    def start_on_host(self, hw: HostWorkerState, role: Role, argv: Sequence[str],
                      env: dict[str, str]) -> None:  # fmt: skip
        try:
            job = hostworker.Job(hw, list(argv), env, on_line=printer(hw.name))
        except hostworker.HostWorkerError as exc:
            raise GcvmError(exc.message, hint=exc.hint) from None
        self.add(hw.name, role, job)

    def add(self, name: str, role: Role, proc: Any) -> None:
        self.procs[name] = proc
        self.roles[name] = role

    def watch(self, deadline: float) -> dict[str, int]:
        """Until every master exits 0 (then the workers' own exit), or any rank fails."""
        codes: dict[str, int] = {}
        while True:
            for vm, proc in self.procs.items():
                if vm in codes:
                    continue
                rc = proc.poll()
                if rc is None:
                    continue
                codes[vm] = rc
                if rc != 0:
                    self.kill_all()
                    tail = "\n".join(f"    {line}" for line in proc.tail(15))
                    raise RankFailed(
                        f"{vm} ({self.roles[vm].value}) exited with status {rc}; "
                        f"last lines:\n{tail}",
                        hint="the other ranks were stopped; `gcvm logs` and the cluster's debug "
                        "log hold more",
                    )
            if len(codes) == len(self.procs):
                return codes
            if time.monotonic() > deadline:
                waiting = sorted(set(self.procs) - set(codes))
                self.kill_all()
                raise Timeout(
                    f"ranks still running at the deadline: {', '.join(waiting)}",
                    hint="raise --timeout, or lower --repeat/--batch under TCG",
                )
            time.sleep(0.2)

    def kill_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()


_print_lock = threading.Lock()


def printer(vm: str) -> Callable[[str], None]:
    """A rank's output lines on the console, each marked with its machine."""

    def emit(line: str) -> None:
        with _print_lock:
            console.print(f"[cyan]\\[{vm}][/] {line}", markup=True, highlight=False, soft_wrap=True)

    return emit
