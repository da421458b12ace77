"""Per-forward time accounting shared by the master's proxies and the transports.

The benchmark splits a forward into: master compute (everything the master does that is not
below), transfer (round trip minus the worker's own compute), worker compute, and de-obfuscation
(input permutation and masking before the call, unmasking, de-mixing and bias after it).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field


@dataclass
class Timings:
    roundtrip_s: float = 0.0  # master-side wall time of worker calls (send + worker + receive)
    worker_s: float = 0.0  # the worker's own compute, as it reports it
    deobf_s: float = 0.0  # permutation, masking, unmasking, de-mixing, bias: master side
    calls: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    extra: dict[str, float] = field(default_factory=dict)

    def reset(self) -> None:
        self.roundtrip_s = self.worker_s = self.deobf_s = 0.0
        self.calls = self.bytes_sent = self.bytes_received = 0
        self.extra.clear()

    @contextlib.contextmanager
    def deobf(self) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.deobf_s += time.perf_counter() - start

    def breakdown_ms(self, total_s: float) -> dict[str, float]:
        transfer = max(self.roundtrip_s - self.worker_s, 0.0)
        master = max(total_s - self.roundtrip_s - self.deobf_s, 0.0)
        return {
            "master_compute": master * 1e3,
            "transfer": transfer * 1e3,
            "worker_compute": self.worker_s * 1e3,
            "deobfuscation": self.deobf_s * 1e3,
        }
