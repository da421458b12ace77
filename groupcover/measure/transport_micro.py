"""`python -m groupcover bench --transport-micro`: what one worker call costs on the real wire.

For the payloads of MiniLM's and BERT-base's offloaded layers (the activation out, the result
back, at the batch and sequence given) it times calls over gcvm's TCP wire (`groupcover.wire`):
per-call round trip, the worker's own compute as it reports it, and the wire's share (round trip
minus compute) as latency and bandwidth. float32 is what `plain-offload` and `groupcover-nomask`
send; the masked modes' int32 residues take the same bytes (float64 is what they sent before,
kept for comparison). A tiny call (one row) gives the per-call floor.

On its own it starts a worker on loopback in a process of its own (`--serve 127.0.0.1:0`); with
`--target ADDR:PORT` it measures a worker already serving there (`gcvm run bench
--transport-micro` starts one on the host worker or a VM and runs the client in a master VM).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from groupcover import texttable
from groupcover.errors import UsageError
from groupcover.layer_op import LayerOp
from groupcover.wire.client import TcpTransport
from groupcover.wire.server import Limits, WorkerServer
from groupcover.worker import WorkerState

READY_MARK = "GROUPCOVER_MICRO_SERVING"
RESULT_MARK = "GROUPCOVER_MICRO_JSON"
# (hidden, intermediate) of each model's encoder: 4 hidden x hidden, hidden -> 4h, 4h -> hidden
MODELS = {"minilm": (384, 1536), "bert-base": (768, 3072)}
DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass(frozen=True)
class Payload:
    model: str
    layer: str
    in_features: int
    out_features: int
    rows: int  # batch x seq (1 for the tiny call)


def payloads(batch: int, seq: int, models: Sequence[str] = tuple(MODELS)) -> list[Payload]:
    found: list[Payload] = []
    for model in models:
        if model not in MODELS:
            raise UsageError(f"unknown model {model!r}", hint=f"choose {', '.join(MODELS)}")
        h, f = MODELS[model]
        found += [
            Payload(model, "tiny (1 row)", h, h, 1),
            Payload(model, f"{h}->{h}", h, h, batch * seq),
            Payload(model, f"{h}->{f}", h, f, batch * seq),
            Payload(model, f"{f}->{h}", f, h, batch * seq),
        ]
    return found


def parse_address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not (port.isascii() and port.isdigit() and int(port) < 65536):
        raise UsageError(f"{text!r} is not ADDR:PORT", hint="e.g. 127.0.0.1:29600")
    return host.strip("[]"), int(port)


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def measure_one(address: tuple[str, int], p: Payload, dtype: str, repeat: int,
                timeout_s: float) -> dict[str, object]:  # fmt: skip
    kind = DTYPES[dtype]
    transport = TcpTransport(address, "worker", f"micro/{p.model}/{p.layer}/{dtype}", timeout_s)
    try:
        weight = torch.randn(p.out_features, p.in_features, dtype=kind)
        transport.publish("w", weight, LayerOp("linear"))
        x = torch.randn(1, p.rows, p.in_features, dtype=kind)
        for _ in range(2):  # warm: first-touch allocations on both sides
            transport.run("w", x)
        rts: list[float] = []
        wire: list[float] = []
        for _ in range(repeat):
            before = transport.timings.worker_s
            start = time.perf_counter()
            transport.run("w", x)
            rt = time.perf_counter() - start
            rts.append(rt)
            wire.append(max(rt - (transport.timings.worker_s - before), 1e-9))
    finally:
        transport.close()
    sent = x.numel() * x.element_size()
    received = p.rows * p.out_features * x.element_size()
    wire_s = statistics.median(wire)
    return {
        "model": p.model, "layer": p.layer, "dtype": dtype, "rows": p.rows,
        "bytes_sent": sent, "bytes_received": received,
        "roundtrip_ms": {"median": statistics.median(rts) * 1e3, "p10": _quantile(rts, 0.1) * 1e3,
                         "p90": _quantile(rts, 0.9) * 1e3},
        "worker_ms": (statistics.median(rts) - wire_s) * 1e3 if rts else 0.0,
        "wire_ms": wire_s * 1e3,
        "wire_mb_s": (sent + received) / wire_s / 1e6,
        "repeat": repeat,
    }  # fmt: skip


def measure(address: tuple[str, int], batch: int, seq: int, repeat: int, timeout_s: float,
            models: Sequence[str] = tuple(MODELS),
            dtypes: Sequence[str] = tuple(DTYPES)) -> list[dict[str, object]]:  # fmt: skip
    return [
        measure_one(address, p, dtype, repeat, timeout_s)
        for p in payloads(batch, seq, models)
        for dtype in dtypes
    ]


def render(rows: list[dict[str, object]], title: str) -> str:
    headers = ("model", "layer", "dtype", "out+back KiB", "round trip ms", "p10-p90 ms",
               "worker ms", "wire ms", "wire MB/s")  # fmt: skip
    table = []
    for r in rows:
        rt = r["roundtrip_ms"]
        assert isinstance(rt, dict)
        kib = (int(r["bytes_sent"]) + int(r["bytes_received"])) / 1024  # type: ignore[call-overload]
        table.append((
            str(r["model"]), str(r["layer"]), str(r["dtype"]), f"{kib:.0f}", f"{rt['median']:.2f}",
            f"{rt['p10']:.2f}-{rt['p90']:.2f}", f"{r['worker_ms']:.2f}", f"{r['wire_ms']:.2f}",
            f"{r['wire_mb_s']:.0f}",
        ))  # fmt: skip
    return texttable.render(title, headers, table, left=3)


def serve(host: str, port: int, seconds: float, timeout_s: float) -> int:
    """A worker for the micro-benchmark on host:port until `seconds` pass (or it is killed)."""
    server = WorkerServer(host, port, WorkerState(), Limits(timeout_s=timeout_s), "micro-worker")
    server.start()
    bound, bound_port = server.address[:2]
    print(f"{READY_MARK} {bound}:{bound_port} {server.state.device}", flush=True)
    try:
        threading.Event().wait(seconds)
    finally:
        server.stop()
    return 0


def _local_server(timeout_s: float) -> tuple[subprocess.Popen[str], tuple[str, int]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "groupcover.measure.transport_micro", "--serve", "127.0.0.1:0",
         "--timeout", str(timeout_s)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith(READY_MARK):
        proc.kill()
        raise UsageError(f"the loopback worker did not start (said {line.strip()!r})")
    return proc, parse_address(line.split()[1])


def run(batch: int, seq: int, repeat: int, json_path: Path | None, threads: int,
        target: str | None = None, label: str | None = None,
        timeout_s: float = 60.0) -> int:  # fmt: skip
    torch.set_num_threads(threads)
    repeat = max(repeat, 5)
    server = None
    if target is None:
        server, address = _local_server(timeout_s)
        where = label or "loopback"
    else:
        address = parse_address(target)
        where = label or f"to {target}"
    try:
        rows = measure(address, batch, seq, repeat, timeout_s)
    finally:
        if server is not None:
            server.terminate()
            server.wait(10)
    title = f"Wire per call, {where} (batch {batch} x seq {seq}, median of {repeat})"
    print(render(rows, title))
    document = {"where": where, "address": f"{address[0]}:{address[1]}", "batch": batch,
                "seq": seq, "threads": threads, "rows": rows}  # fmt: skip
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(document, indent=2) + "\n")
        print(f"{RESULT_MARK} {json_path}", flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m groupcover.measure.transport_micro")
    parser.add_argument("--serve", required=True, help="ADDR:PORT to serve on (port 0: any)")
    parser.add_argument("--seconds", type=float, default=900.0, help="serve this long at most")
    parser.add_argument("--timeout", type=float, default=60.0, help="per-message timeout (s)")
    args = parser.parse_args(argv)
    host, port = parse_address(args.serve)
    torch.set_num_threads(1)
    return serve(host, port, args.seconds, args.timeout)


if __name__ == "__main__":
    sys.exit(main())
