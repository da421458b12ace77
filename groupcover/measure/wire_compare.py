"""`python -m groupcover.measure.wire_compare`: the default wire against torch-rpc (TCP forced),
in one run, on loopback, with MiniLM's offloaded shapes (plain offload: 6 layers x Q, K, V, O, FFN1,
FFN2 at batch x seq tokens). This process is the master of both; one worker process per
transport. Forwards alternate between the transports, so both see the same machine; it prints
the median forward and its transfer part (round trips minus the worker's own compute).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import torch

from groupcover.rendezvous import Rendezvous
from groupcover.transport import LayerOp, Transport
from groupcover.wire.client import TcpTransport
from groupcover.wire.server import WorkerServer
from groupcover.worker import WorkerState

HIDDEN, FFN, LAYERS = 384, 1536, 6
SHAPES = [(HIDDEN, HIDDEN)] * 4 + [(FFN, HIDDEN), (HIDDEN, FFN)]


def _forward(transport: Transport, x: torch.Tensor, wide: torch.Tensor) -> tuple[float, float]:
    transport.timings.reset()
    start = time.perf_counter()
    for layer in range(LAYERS):
        for i, (_, fan_in) in enumerate(SHAPES):
            transport.run(f"{layer}.{i}", x if fan_in == HIDDEN else wide)
    total = time.perf_counter() - start
    return total, transport.timings.transfer_s


def _serve() -> int:
    """The TCP worker: prints `port N`, serves until stdin closes."""
    torch.set_num_threads(1)
    server = WorkerServer("127.0.0.1", 0, WorkerState(torch.device("cpu"))).start()
    print(f"port {server.address[1]}", flush=True)
    sys.stdin.read()
    server.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m groupcover.measure.wire_compare", description=__doc__
    )
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        return _serve()

    # torch.distributed.rpc and the bench load slowly: only the master's side needs them
    from groupcover import rpc
    from groupcover.bench.local import free_port

    torch.set_num_threads(1)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    port = free_port()
    rpc_worker = subprocess.Popen(
        [sys.executable, "-m", "groupcover", "launch", "--role", "worker", "--rank", "1",
         "--world-size", "2", "--master-addr", "127.0.0.1", "--master-port", str(port),
         "--ifname", "lo", "--force-tcp", "--timeout", "120", "--transport", "torch-rpc"],
        env=env,
    )  # fmt: skip
    tcp_worker = subprocess.Popen(
        [sys.executable, "-m", "groupcover.measure.wire_compare", "--serve"], env=env,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert tcp_worker.stdout is not None and tcp_worker.stdin is not None
        address = ("127.0.0.1", int(tcp_worker.stdout.readline().split()[1]))
        rdv = Rendezvous(0, 2, "127.0.0.1", port, ifname="lo", force_tcp=True, timeout_s=120)
        rpc.join(rdv, "master")
        transports: dict[str, Transport] = {
            "tcp": TcpTransport(address, "worker1", timeout_s=120),
            "torch-rpc": rpc.RpcTransport(1, owner="0/compare", timeout_s=120),
        }
        gen = torch.Generator().manual_seed(0)
        weights = [torch.randn(out, fan_in, generator=gen) / fan_in**0.5 for out, fan_in in SHAPES]
        for transport in transports.values():
            for layer in range(LAYERS):
                for i, weight in enumerate(weights):
                    transport.publish(f"{layer}.{i}", weight, LayerOp("linear"))
        tokens = args.batch * args.seq
        x = torch.randn(args.batch, args.seq, HIDDEN, generator=gen)
        wide = torch.randn(args.batch, args.seq, FFN, generator=gen)
        for transport in transports.values():  # warm up
            _forward(transport, x, wide)
        seen: dict[str, list[tuple[float, float]]] = {name: [] for name in transports}
        for _ in range(args.repeat):
            for name, transport in transports.items():
                seen[name].append(_forward(transport, x, wide))
        print(f"plain offload, MiniLM shapes, {tokens} tokens, {args.repeat} interleaved forwards")
        medians = {}
        for name, values in seen.items():
            total = statistics.median(v[0] for v in values) * 1e3
            transfer = statistics.median(v[1] for v in values) * 1e3
            medians[name] = (total, transfer)
            print(f"  {name:10s} forward {total:8.1f} ms   transfer {transfer:7.1f} ms")
        (tcp_total, tcp_transfer), (rpc_total, rpc_transfer) = medians["tcp"], medians["torch-rpc"]
        print(f"  tcp / torch-rpc: forward {tcp_total / rpc_total:.3f}, "
              f"transfer {tcp_transfer / rpc_transfer:.3f}")  # fmt: skip
        # single calls, alternating transports call by call: the least disturbed comparison
        calls = {"Q/K/V/O": ("0.0", x), "FFN1": ("0.4", x), "FFN2": ("0.5", wide)}
        per_call: dict[tuple[str, str], list[float]] = {}
        for _ in range(args.repeat * 3):
            for label, (layer_id, tensor) in calls.items():
                for name, transport in transports.items():
                    start = time.perf_counter()
                    transport.run(layer_id, tensor)
                    per_call.setdefault((name, label), []).append(time.perf_counter() - start)
        print(f"single calls, interleaved ({args.repeat * 3} each), median round trip:")
        for label in calls:
            tcp_ms = statistics.median(per_call[("tcp", label)]) * 1e3
            rpc_ms = statistics.median(per_call[("torch-rpc", label)]) * 1e3
            print(f"  {label:8s} tcp {tcp_ms:7.2f} ms   torch-rpc {rpc_ms:7.2f} ms   "
                  f"ratio {tcp_ms / rpc_ms:.3f}")  # fmt: skip
        for transport in transports.values():
            transport.close()
        tcp_worker.stdin.close()
        rpc.finish(rdv)
        return 0
    finally:
        for proc in (tcp_worker, rpc_worker):
            if proc.poll() is None:
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


if __name__ == "__main__":
    sys.exit(main())
