"""What one RUN may make the worker allocate and compute, against a real worker in its own
process over loopback (so the peak resident set measured is the worker's own, read back with the
wire's MEMORY request).

The worker bounds the tensors it receives and the result it sends; a convolution also builds an
unfolded (im2col) copy of its input inside torch, which a small weight with a large kernel makes
far larger than both. The red team's request: a 512-byte float64 conv2d weight (1x1x8x8) and an
8 MiB input (1x1x1024x1024) under a 16 MiB tensor limit grew the worker's peak RSS by over
500 MiB. The worker now prices a RUN from its shapes before it reads the input.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
import torch

from groupcover.errors import WorkerError
from groupcover.transport import LayerOp
from groupcover.wire import schema
from groupcover.wire.client import TcpTransport

MIB = 1 << 20
TENSOR_LIMIT = 16 * MIB  # the red team's worker
RUN_MACS = 2 * 10**9  # about 0.1 s of one core: the compute bound of this worker
WORKER = f"""
import sys, torch
from groupcover.wire.server import Limits, WorkerServer
from groupcover.worker import WorkerState
torch.set_num_threads(1)
limits = Limits(max_tensor_bytes={TENSOR_LIMIT}, max_run_macs={RUN_MACS}, timeout_s=30)
server = WorkerServer("127.0.0.1", 0, WorkerState(torch.device("cpu")), limits).start()
print(f"port {{server.address[1]}}", flush=True)
sys.stdin.read()
server.stop()
"""


@pytest.fixture
def worker() -> Iterator[tuple[str, int]]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", WORKER], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env)  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("port "), line
        yield ("127.0.0.1", int(line.split()[1]))
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(timeout=10)


def test_a_small_conv_request_cannot_make_the_worker_unfold_hundreds_of_mib(
    worker: tuple[str, int],
) -> None:
    transport = TcpTransport(worker, "worker1", timeout_s=30)
    try:
        weight = torch.ones(1, 1, 8, 8, dtype=torch.float64)  # 512 bytes
        x = torch.ones(1, 1, 1024, 1024, dtype=torch.float64)  # 8 MiB, under the tensor limit
        op = LayerOp("conv2d", stride=(1, 1), padding=(0, 0), dilation=(1, 1))
        cost = schema.run_cost(op, tuple(x.shape), tuple(weight.shape), 8)
        assert cost.nbytes > 500 * MIB  # what the unfold alone takes
        transport.publish("conv", weight, op)
        before = transport.worker_peak_rss()
        assert before is not None
        with pytest.raises(WorkerError, match="over the worker's limit"):
            transport.run("conv", x)
        after = transport.worker_peak_rss()  # the session goes on
        assert after is not None
        grown = (after - before) / MIB
        assert grown < 16, f"the worker's peak RSS grew by {grown:.0f} MiB"
    finally:
        transport.close()


def test_a_call_over_the_compute_bound_is_refused_before_it_starts(
    worker: tuple[str, int],
) -> None:
    """No torch op can be interrupted, so a RUN's deadline is its price in multiply-accumulates:
    a 3x3 conv2d of 512 channels on a 64x64 input (9 MiB weight, 8 MiB input, 88 MiB of
    allocations, all under the worker's byte limits) is 9.7 GMAC, refused at once."""
    transport = TcpTransport(worker, "worker1", timeout_s=30)
    try:
        op = LayerOp("conv2d", stride=(1, 1), padding=(1, 1), dilation=(1, 1))
        weight, x = torch.ones(512, 512, 3, 3), torch.ones(1, 512, 64, 64)
        assert schema.run_cost(op, tuple(x.shape), tuple(weight.shape), 4).macs > 4 * RUN_MACS
        transport.publish("conv", weight, op)
        started = time.monotonic()
        with pytest.raises(WorkerError, match="multiply-accumulates is over the worker's limit"):
            transport.run("conv", x)
        assert time.monotonic() - started < 2.0
    finally:
        transport.close()


def test_a_real_minilm_sized_layer_at_batch_8_seq_128_is_still_served(
    worker: tuple[str, int],
) -> None:
    """MiniLM's FFN up-projection (384 -> 1536) at the benchmark's default batch 8 x seq 128,
    in float64 as the masked modes send it: a 12 MiB result under the same 16 MiB limit."""
    transport = TcpTransport(worker, "worker1", timeout_s=30)
    try:
        gen = torch.Generator().manual_seed(0)
        weight = torch.randn(1536, 384, dtype=torch.float64, generator=gen)
        x = torch.randn(8, 128, 384, dtype=torch.float64, generator=gen)
        transport.publish("ffn1", weight, LayerOp("linear"))
        y = transport.run("ffn1", x)
        assert torch.allclose(y, x @ weight.T)
    finally:
        transport.close()
