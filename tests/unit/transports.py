"""Transport fixtures: `transport` runs a test over every transport: in-process, the default TCP
wire to a worker server in its own process, and real torch RPC to a worker process on loopback
(TCP only, world size 2; the test process is the master, rank 0)."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest
import torch

from groupcover.transport import InProcessTransport, Transport

RPC_TIMEOUT_S = 30.0
_owners = itertools.count()


def free_port() -> int:
    from groupcover.bench.local import free_port as pick

    return pick()


def worker_argv(
    rank: int,
    world_size: int,
    port: int,
    timeout_s: float = RPC_TIMEOUT_S,
    transport: str = "tcp",
) -> list[str]:
    return [
        sys.executable, "-m", "groupcover", "launch", "--role", "worker", "--rank", str(rank),
        "--world-size", str(world_size), "--master-addr", "127.0.0.1", "--master-port", str(port),
        "--ifname", "lo", "--force-tcp", "--timeout", f"{timeout_s:g}", "--transport", transport,
    ]  # fmt: skip


@pytest.fixture(scope="session")
def wire_worker() -> Iterator[tuple[str, int]]:
    """A worker server (the default wire) in its own process; yields its address."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "tests.unit.wire_worker"], env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stdin is not None
        line = proc.stdout.readline().split()
        assert line[:1] == ["port"], line
        yield ("127.0.0.1", int(line[1]))
        proc.stdin.close()
        assert proc.wait(timeout=RPC_TIMEOUT_S) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def rpc_world() -> Iterator[int]:
    """This process as master rank 0, one worker process as rank 1; yields the worker's rank."""
    from groupcover import rpc

    torch.set_num_threads(1)
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    worker = subprocess.Popen(worker_argv(1, 2, port, transport="torch-rpc"), env=env)
    try:
        rpc.join(
            rpc.Rendezvous(0, 2, "127.0.0.1", port, ifname="lo", force_tcp=True,
                           timeout_s=RPC_TIMEOUT_S),
            "master",
        )  # fmt: skip
        yield 1
        rpc.leave(graceful=True)
        assert worker.wait(timeout=RPC_TIMEOUT_S) == 0
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()


@pytest.fixture(params=["inprocess", "tcp", pytest.param("rpc", marks=pytest.mark.slow)])
def transport(request: pytest.FixtureRequest) -> Iterator[Transport]:
    """A fresh transport with its own owner key on the worker; closed after the test."""
    made: Transport
    if request.param == "inprocess":
        made = InProcessTransport()
    elif request.param == "tcp":
        from groupcover.wire.tcp import TcpTransport

        address = request.getfixturevalue("wire_worker")
        made = TcpTransport(address, "worker1", owner=f"0/test{next(_owners)}",
                            timeout_s=RPC_TIMEOUT_S)  # fmt: skip
    else:
        from groupcover.rpc import RpcTransport

        worker_rank = request.getfixturevalue("rpc_world")
        made = RpcTransport(worker_rank, owner=f"0/test{next(_owners)}", timeout_s=RPC_TIMEOUT_S)
    yield made
    made.close()
