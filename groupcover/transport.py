"""The narrow interface between the protocol (master proxies) and the wire.

The protocol code only ever calls `publish` once per layer at setup and `run`/`run_async` per
forward. Every tensor that leaves the master goes through `_emit`, so observers (the payload
audit, tests) see exactly what the worker sees.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Literal

import torch

from groupcover.timing import Timings

OpKind = Literal["linear", "conv1d", "conv2d"]


@dataclass(frozen=True)
class LayerOp:
    """What the worker computes for one published layer: no bias, ever."""

    kind: OpKind
    stride: tuple[int, ...] = (1,)
    padding: tuple[int, ...] = (0,)
    dilation: tuple[int, ...] = (1,)
    params: dict[str, int] = field(default_factory=dict)


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
        """Send one layer's published (already obfuscated, or plain in plain-offload) weight once."""

    @abstractmethod
    def run_async(self, layer_id: str, x: torch.Tensor) -> Future[torch.Tensor]:
        """The worker computes op(x, weight) without bias; the result arrives in the future."""

    def run(self, layer_id: str, x: torch.Tensor) -> torch.Tensor:
        return self.run_async(layer_id, x).result()

    @abstractmethod
    def close(self) -> None:
        """Release the worker's layers for this master and the connection."""
