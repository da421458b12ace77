"""The test worker for tests/unit/transports.py, its state a `ClaimingState`.

`python -m tests.unit.wire_worker`: a worker server on the default wire; prints `port N` once it
listens on 127.0.0.1, then serves until stdin closes.
`python -m tests.unit.wire_worker --torch-rpc PORT`: rank 1 of a torch-rpc world of 2 whose
rendezvous is on 127.0.0.1:PORT; serves until the master leaves."""

from __future__ import annotations

import sys

import torch

from groupcover.rendezvous import Rendezvous
from groupcover.wire.server import Limits, WorkerServer
from tests.unit.transports import RPC_TIMEOUT_S, ClaimingState


def main(argv: list[str]) -> None:
    torch.set_num_threads(1)
    state = ClaimingState(torch.device("cpu"))
    if argv[:1] == ["--torch-rpc"]:
        from groupcover import rpc, worker

        worker._STATE = state  # what remote_run computes with in this process
        rpc.serve(Rendezvous(1, 2, "127.0.0.1", int(argv[1]), ifname="lo", force_tcp=True,
                             timeout_s=RPC_TIMEOUT_S))  # fmt: skip
        return
    server = WorkerServer("127.0.0.1", 0, state, Limits(timeout_s=30))
    server.start()
    print(f"port {server.address[1]}", flush=True)
    sys.stdin.read()  # the test closes stdin (or dies): stop
    server.stop()


if __name__ == "__main__":
    main(sys.argv[1:])
