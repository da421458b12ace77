"""`bench --local`: a master and its worker(s) as processes on loopback (a second worker, rank
2, computes the masks' products when a `-2w` mode runs)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from typing import ClassVar


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class LocalRun:
    """`bench --local`: a master and a worker as two processes on loopback."""

    launch_args: tuple[str, ...]  # model, modes, sizes, json... passed to the master
    force_tcp: bool = True
    timeout_s: float = 600.0
    port: int = 0  # 0: pick a free one
    transport: str = "tcp"
    worker_args: tuple[str, ...] = ()  # e.g. --package DIR (the worker's copy of the package)
    workers: int = 1  # 2: rank 2 is the mask worker of the -2w modes

    BOTH_RANKS: ClassVar[tuple[str, ...]] = ("--timeout", "--transport")  # given to both, below

    def argv(self, role: str, port: int, rank: int = 1) -> list[str]:
        """One rank's command line: the master is rank 0, workers ranks 1.. (`rank`)."""
        argv = [sys.executable, "-m", "groupcover", "launch", "--role", role,
                "--rank", "0" if role == "master" else str(rank),
                "--world-size", str(1 + self.workers),
                "--master-addr", "127.0.0.1", "--master-port", str(port), "--ifname", "lo",
                "--timeout", f"{self.timeout_s:g}", "--transport", self.transport]  # fmt: skip
        if self.force_tcp:
            argv.append("--force-tcp")
        if role == "master":
            argv += ["--worker", "1", *self.launch_args]
            if self.workers > 1:
                argv += ["--mask-worker", "2"]
        else:
            argv += list(self.worker_args)
        return argv


def run_local(local: LocalRun) -> int:
    port = local.port or free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    workers = [subprocess.Popen(local.argv("worker", port, rank), env=env)
               for rank in range(1, 1 + local.workers)]  # fmt: skip
    try:
        master = subprocess.run(local.argv("master", port), env=env, check=False)
        if master.returncode != 0:
            return master.returncode
        codes = [worker.wait(timeout=local.timeout_s) for worker in workers]
        return next((code for code in codes if code != 0), 0)
    except subprocess.TimeoutExpired:
        print("groupcover: error: a local worker did not exit after the master", file=sys.stderr)
        return 3
    finally:
        for worker in workers:
            _stop(worker)


def _stop(worker: subprocess.Popen[bytes]) -> None:
    if worker.poll() is None:
        worker.terminate()
        try:
            worker.wait(timeout=10)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
