"""A standalone worker server for the protocol tests: `python -m tests.unit.wire_worker`.

Prints `port N` once it listens on 127.0.0.1, then serves until stdin closes."""

from __future__ import annotations

import sys

import torch

from groupcover.wire.server import Limits, WorkerServer
from groupcover.worker import WorkerState


def main() -> None:
    torch.set_num_threads(1)
    server = WorkerServer("127.0.0.1", 0, WorkerState(torch.device("cpu")), Limits(timeout_s=30))
    server.start()
    print(f"port {server.address[1]}", flush=True)
    sys.stdin.read()  # the test closes stdin (or dies): stop
    server.stop()


if __name__ == "__main__":
    main()
