"""Transport fixtures: a test that takes `transport` (or `two_sessions`) runs over every transport:
in-process, the default TCP wire to a worker server in its own process, and real torch RPC to a
worker process on loopback (TCP only, world size 2; the test process is the master, rank 0).

Every worker here is `ClaimingState`: honest, except that it reports whatever time an input of
`CLAIM_SHAPE` asks it to, so one test can check that each transport keeps the same books of a
worker that lies about its time."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest
import torch

from groupcover.inprocess import InProcessTransport
from groupcover.transport import Transport
from groupcover.wire.client import TcpTransport
from groupcover.worker import WorkerState

RPC_TIMEOUT_S = 30.0
TRANSPORTS = ["inprocess", "tcp", pytest.param("torch-rpc", marks=pytest.mark.slow)]
CLAIM_SHAPE = (1, 1, 1)  # an input of this shape: the worker claims its one value as its seconds
_owners = itertools.count()


class ClaimingState(WorkerState):
    """Computes honestly; for an input of CLAIM_SHAPE it reports the input's value as its time."""

    def run(self, owner: str, layer_id: str, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        y, worker_s = super().run(owner, layer_id, x)
        if tuple(x.shape) == CLAIM_SHAPE:
            return y, float(x.reshape(-1)[0])
        return y, worker_s


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


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="session")
def wire_worker() -> Iterator[tuple[str, int]]:
    """A worker server (the default wire) in its own process; yields its address."""
    proc = subprocess.Popen([sys.executable, "-m", "tests.unit.wire_worker"], env=_env(),
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
    from groupcover.rendezvous import Rendezvous

    torch.set_num_threads(1)
    port = free_port()
    argv = [sys.executable, "-m", "tests.unit.wire_worker", "--torch-rpc", str(port)]
    worker = subprocess.Popen(argv, env=_env())
    try:
        rpc.join(
            Rendezvous(0, 2, "127.0.0.1", port, ifname="lo", force_tcp=True,
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


def _open(request: pytest.FixtureRequest, kind: str, state: WorkerState | None) -> Transport:
    """A fresh session with its own owner key on the worker of `kind` (`state`: in-process)."""
    owner = f"0/test{next(_owners)}"
    if kind == "inprocess":
        return InProcessTransport(state, owner=owner)
    if kind == "tcp":
        address = request.getfixturevalue("wire_worker")
        return TcpTransport(address, "worker1", owner=owner, timeout_s=RPC_TIMEOUT_S)
    from groupcover.rpc import RpcTransport  # torch.distributed.rpc: loaded only when used

    return RpcTransport(request.getfixturevalue("rpc_world"), owner=owner, timeout_s=RPC_TIMEOUT_S)


@pytest.fixture(params=TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> Iterator[Transport]:
    """A fresh transport with its own owner key on the worker; closed after the test."""
    made = _open(request, request.param, ClaimingState(torch.device("cpu")))
    yield made
    made.close()


@pytest.fixture(params=TRANSPORTS)
def two_sessions(request: pytest.FixtureRequest) -> Iterator[tuple[Transport, Transport]]:
    """Two masters' sessions on the same worker."""
    state = ClaimingState(torch.device("cpu"))
    made = (_open(request, request.param, state), _open(request, request.param, state))
    yield made
    for session in made:
        session.close()
