"""`--request-rate R`: each mode served a stream of requests arriving R times a second.

The timed forwards measure one forward with its masks ready, and the synchronous top-up after
it (`mask_generation_ms`) separately. A user sees neither alone: requests arrive at some rate,
and between them the master is idle. Here each mode serves `requests` forwards arriving at
fixed intervals 1/R apart (FIFO: a request that arrives while the master is busy waits), with
the mask pools refilled by `groupcover.refill.IdleRefill` (a nice-19 thread) instead of after
each forward; a forward that finds a pool empty draws its pair inside itself. What a user
would see: the rate actually served, the latency from arrival to result (queueing included),
the master's CPU per request (the refill thread's included: it is the master's CPU too), and
how many pairs were drawn inside forwards because the refill had not kept up.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from groupcover.bench.stats import ModeRun, quantile
from groupcover.refill import IdleRefill


def _pairs(module: Any, kind: str) -> int:
    masks = getattr(module, "masks", None)
    return 0 if masks is None else int(masks.stats()[kind]["pairs"])


def serve_at_rate(run: ModeRun, inputs: tuple[torch.Tensor, ...], rate: float, requests: int,
                  batch: int) -> dict[str, Any]:  # fmt: skip
    """Serves `requests` forwards arriving every 1/rate s; returns what a user would see."""
    module = run.module
    masks = getattr(module, "masks", None)
    idle = None if masks is None or getattr(module, "mask_worker", False) else IdleRefill(masks)
    online = _pairs(module, "online_refill")
    refilled = _pairs(module, "idle_refill")
    latencies: list[float] = []
    cpu = time.process_time()
    if idle is not None:
        idle.start()
    try:
        start = time.perf_counter()
        for i in range(requests):
            arrival = start + i / rate
            pause = arrival - time.perf_counter()
            if pause > 0:
                time.sleep(pause)  # idle: the refill thread has the CPU
            with torch.no_grad():
                module(*inputs)
            latencies.append(time.perf_counter() - arrival)
        elapsed = time.perf_counter() - start
    finally:
        if idle is not None:
            idle.stop()
    cpu = time.process_time() - cpu
    # over the stream's own span (requests / rate) or, if the master fell behind, until the
    # last result: the rate served never exceeds the rate asked
    served = requests / max(elapsed, requests / rate)
    return {
        "request_rate": rate,
        "requests": requests,
        "served_per_s": served,
        "samples_per_s": served * batch,
        "kept_up": served >= 0.95 * rate,
        "latency_ms": {
            "median": statistics.median(latencies) * 1e3,
            "p90": quantile(latencies, 0.9) * 1e3,
            "max": max(latencies) * 1e3,
        },
        "cpu_ms_per_request": cpu / requests * 1e3,
        "refill": None if idle is None else f"idle thread, nice {19 if idle.lowered else 0}",
        "masks_drawn_in_forwards": _pairs(module, "online_refill") - online,
        "masks_drawn_idle": _pairs(module, "idle_refill") - refilled,
    }


def rate_lines(results: list[dict[str, Any]]) -> list[str]:
    """One line per mode served at a request rate."""
    lines = []
    for r in results:
        at = r.get("at_rate")
        if not at:
            continue
        lat = at["latency_ms"]
        drawn = "" if at["refill"] is None else (
            f"; masks: {at['masks_drawn_idle']} pairs drawn idle, "
            f"{at['masks_drawn_in_forwards']} inside forwards")  # fmt: skip
        lines.append(
            f"at {at['request_rate']:g} requests/s, {r['mode']}: served "
            f"{at['served_per_s']:.2f} requests/s ({at['samples_per_s']:.2f} samples/s"
            f"{'' if at['kept_up'] else ', fell behind'}), latency median {lat['median']:.0f} "
            f"ms, p90 {lat['p90']:.0f} ms, master CPU {at['cpu_ms_per_request']:.0f} ms per "
            f"request{drawn}"
        )
    return lines
