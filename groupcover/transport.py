"""The narrow interface between the protocol (master proxies) and the wire.

The protocol code only ever calls `publish` once per layer at setup and `run`/`run_async` per
forward. Every tensor that leaves the master goes through `_emit`, so observers (the payload
audit, tests) see exactly what the worker sees.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from concurrent.futures import Future

import torch

from groupcover.layer_op import LayerOp, OpKind, PublishedRef
from groupcover.timing import Timings
from groupcover.worker import WorkerState

__all__ = ["InProcessTransport", "LayerOp", "Observer", "OpKind", "PublishedRef", "Transport",
           "payload_bytes"]  # fmt: skip


# what every result made over torch.distributed.rpc says (launch, bench, seed scripts)
TORCH_RPC_WARNING = (
    "torch-rpc: the worker could execute code in the master (torch.distributed.rpc runs any "
    "pickled callable a peer sends); use --transport tcp"
)

# observer(event, layer_id, tensor): event is "publish" or "run"
Observer = Callable[[str, str, torch.Tensor], None]


class Transport(ABC):
    def __init__(self) -> None:
        self.timings = Timings()
        self._observers: list[Observer] = []

    def add_observer(self, observer: Observer) -> None:
        self._observers.append(observer)

    def _emit(self, event: str, layer_id: str, tensor: torch.Tensor) -> None:
        for observer in self._observers:
            observer(event, layer_id, tensor)

    @abstractmethod
    def publish(self, layer_id: str, weight: torch.Tensor, op: LayerOp) -> None:
        """Send one layer's published weight once (obfuscated; plain in plain-offload)."""

    def publish_ref(
        self,
        layer_id: str,
        ref: PublishedRef,
        op: LayerOp,
        load: Callable[[], torch.Tensor],
        dtype: torch.dtype,
    ) -> None:
        """Publish a package's layer: by reference where the transport and the worker can
        (the worker loads it from its own copy and checks `ref.sha256`), else by sending
        `load()` (the weight in `dtype`, read from the master's copy)."""
        self.publish(layer_id, load(), op)

    @abstractmethod
    def run_async(self, layer_id: str, x: torch.Tensor) -> Future[torch.Tensor]:
        """The worker computes op(x, weight) without bias; the result arrives in the future."""

    def run(self, layer_id: str, x: torch.Tensor) -> torch.Tensor:
        return self.run_async(layer_id, x).result()

    @abstractmethod
    def close(self) -> None:
        """Release the worker's layers for this master and the connection."""


def payload_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


class InProcessTransport(Transport):
    """The worker's store lives in this process; tensors are still copied both ways.

    Copies on send and receive mean that a protocol which mutates a tensor after handing it over,
    or mutates a result it got back, behaves here as it would over the wire. Timing fields are
    filled like the RPC transport's, with a zero-cost link.
    """

    def __init__(self, state: WorkerState | None = None, owner: str = "inprocess") -> None:
        super().__init__()
        self.state = state if state is not None else WorkerState(torch.device("cpu"))
        self.owner = owner
        self.published_bytes = 0

    def publish(self, layer_id: str, weight: torch.Tensor, op: LayerOp) -> None:
        sent = weight.detach().clone()
        self._emit("publish", layer_id, sent)
        self.state.publish(self.owner, layer_id, sent, op)
        self.published_bytes += payload_bytes(sent)

    def run_async(self, layer_id: str, x: torch.Tensor) -> Future[torch.Tensor]:
        sent = x.detach().clone()
        self._emit("run", layer_id, sent)
        future: Future[torch.Tensor] = Future()
        start = time.perf_counter()
        try:
            y, worker_s = self.state.run(self.owner, layer_id, sent)
        except Exception as exc:  # delivered through the future, as a remote failure would be
            future.set_exception(exc)
            return future
        timings = self.timings
        timings.roundtrip_s += time.perf_counter() - start
        timings.worker_s += worker_s
        timings.calls += 1
        timings.bytes_sent += payload_bytes(sent)
        timings.bytes_received += payload_bytes(y)
        future.set_result(y)
        return future

    def close(self) -> None:
        self.state.release(self.owner)
