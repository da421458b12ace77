"""Per-forward time accounting shared by the master's proxies and the transports.

The benchmark splits a forward into: master compute (everything the master does that is not
below), transfer (round trip minus the worker's own compute), worker compute, and de-obfuscation
(input permutation and masking before the call, unmasking, de-mixing and bias after it).

`Timings` is also the one bookkeeping of worker calls: every transport (in-process, the TCP wire,
torch-rpc) only moves bytes and hands each completed call to `Timings.record`, which counts it,
adds its bytes, and adds its round trip and the worker's time under one rule (`worker_share`).
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field


def worker_share(claimed_s: float, roundtrip_s: float) -> float:
    """The worker's own time for one call as the master counts it.

    The worker is not trusted, and neither is the time it reports: the claim is held within
    [0, round trip] (a NaN or infinity counts as nothing claimed), so the transfer part of a call
    (round trip minus worker time) is never negative and never more than the round trip.
    """
    try:
        claimed = float(claimed_s)
    except (TypeError, ValueError):  # not even a number (a torch-rpc peer sends any object)
        return 0.0
    if not math.isfinite(claimed) or claimed <= 0.0:
        return 0.0
    return min(claimed, max(roundtrip_s, 0.0))


@dataclass
class Timings:
    roundtrip_s: float = 0.0  # master-side wall time of worker calls (send + worker + receive)
    worker_s: float = 0.0  # the worker's own compute, as it reports it
    deobf_s: float = 0.0  # permutation, masking, unmasking, de-mixing, bias: master side
    calls: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    extra: dict[str, float] = field(default_factory=dict)
    # completions may arrive on another thread (torch-rpc callbacks)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def reset(self) -> None:
        with self._lock:
            self.roundtrip_s = self.worker_s = self.deobf_s = 0.0
            self.calls = self.bytes_sent = self.bytes_received = 0
            self.extra.clear()

    @staticmethod
    def start() -> float:
        """The clock reading a call's round trip starts from (just before its request leaves)."""
        return time.perf_counter()

    def record(self, started: float, claimed_worker_s: float, sent: int, received: int) -> None:
        """One completed worker call: its round trip runs from `started` to now; the worker's
        claimed time counts as `worker_share` of it; `sent` / `received` are payload bytes."""
        roundtrip = max(time.perf_counter() - started, 0.0)
        with self._lock:
            self.roundtrip_s += roundtrip
            self.worker_s += worker_share(claimed_worker_s, roundtrip)
            self.calls += 1
            self.bytes_sent += sent
            self.bytes_received += received

    def record_wait(self, seconds: float) -> None:
        """Time the master waited on a second worker's reply once the first's had come (the
        mask worker of the `-2w` modes, whose call overlaps the worker's): counted with the
        round trips, so it shows as transfer, never as the master's own compute."""
        with self._lock:
            self.roundtrip_s += max(seconds, 0.0)

    @property
    def transfer_s(self) -> float:
        """Round trips minus the worker's time: the link's (and both ends' I/O) share."""
        return max(self.roundtrip_s - self.worker_s, 0.0)

    @contextlib.contextmanager
    def deobf(self) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.deobf_s += time.perf_counter() - start

    def breakdown_ms(self, total_s: float) -> dict[str, float]:
        transfer = self.transfer_s
        master = max(total_s - self.roundtrip_s - self.deobf_s, 0.0)
        return {
            "master_compute": master * 1e3,
            "transfer": transfer * 1e3,
            "worker_compute": self.worker_s * 1e3,
            "deobfuscation": self.deobf_s * 1e3,
        }
