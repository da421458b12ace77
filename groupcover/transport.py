"""The narrow interface between the protocol (master proxies) and the wire.

The protocol code only ever calls `publish` once per layer at setup and `run`/`run_async` per
forward. Every tensor that leaves the master goes through `_emit`, so observers (the payload
audit, tests) see exactly what the worker sees. Each completed call goes to `self.timings.record`
(`groupcover.timing`): a transport moves bytes, the bookkeeping is done once, the same way for all.
The implementations: `groupcover.inprocess` (the worker in this process), `groupcover.wire.client`
(the default TCP wire) and `groupcover.rpc` (opt-in torch-rpc).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from concurrent.futures import Future

import torch

from groupcover.layer_op import LayerOp, OpKind, PublishedRef
from groupcover.timing import Timings

__all__ = ["LayerOp", "Observer", "OpKind", "PublishedRef", "Transport", "payload_bytes"]


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
