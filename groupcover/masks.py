"""One-time input masks (Slalom-style): a pool of `(r, u = op(r, W''))` pairs per layer and shape.

The master blinds the (permuted) input with a fresh `r` before the call and subtracts `u` from the
result. `u` is computed here, in the master, from the copy of the published weight it keeps for
this purpose alone; the worker never computes or sees it. Each pair is popped out of its pool on
use, so no pair can serve twice. Filling ahead of time is the offline cost (`stats()["offline"]`).

When a pool runs dry the policy decides: `refill` (default) draws a fresh pair synchronously and
counts its time as online cost (`stats()["online_refill"]`); `error` raises `MaskPoolExhausted`.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from enum import StrEnum

import torch

from groupcover.errors import GroupCoverError
from groupcover.transport import LayerOp
from groupcover.worker import apply_op

DEFAULT_MASK_SCALE = 1.0


class MaskPolicy(StrEnum):
    REFILL = "refill"
    ERROR = "error"


class MaskPoolExhausted(GroupCoverError):
    """A layer needed a mask for an input shape whose pool was empty, under the `error` policy."""


@dataclass(frozen=True)
class MaskPair:
    r: torch.Tensor  # added to the permuted input
    u: torch.Tensor  # op(r, W''), subtracted from the worker's result


@dataclass
class _Cost:
    seconds: float = 0.0
    pairs: int = 0
    bytes: int = 0

    def add(self, seconds: float, pair: MaskPair) -> None:
        self.seconds += seconds
        self.pairs += 1
        self.bytes += sum(t.numel() * t.element_size() for t in (pair.r, pair.u))

    def as_dict(self) -> dict[str, float]:
        return {"seconds": self.seconds, "pairs": self.pairs, "bytes": self.bytes}


@dataclass
class _Layer:
    weight: torch.Tensor  # the published W'' (the master's copy, for u only)
    op: LayerOp
    pools: dict[tuple[int, ...], deque[MaskPair]] = field(default_factory=dict)


class MaskPool:
    def __init__(
        self,
        generator: torch.Generator,
        policy: MaskPolicy | str = MaskPolicy.REFILL,
        scale: float = DEFAULT_MASK_SCALE,
    ) -> None:
        self.generator = generator
        self.policy = MaskPolicy(policy)
        self.scale = scale
        self._layers: dict[str, _Layer] = {}
        self._offline = _Cost()
        self._online = _Cost()
        self._used = 0

    def register(self, layer_id: str, published_weight: torch.Tensor, op: LayerOp) -> None:
        self._layers[layer_id] = _Layer(published_weight.detach().clone(), op)

    def published_weight(self, layer_id: str) -> torch.Tensor:
        return self._layers[layer_id].weight

    def layer_ids(self) -> list[str]:
        return list(self._layers)

    def available(self, layer_id: str, shape: tuple[int, ...]) -> int:
        pool = self._layers[layer_id].pools.get(tuple(shape))
        return 0 if pool is None else len(pool)

    def fill(
        self, layer_id: str, shape: tuple[int, ...], pairs: int, like: torch.Tensor | None = None
    ) -> None:
        """Offline: add `pairs` fresh pairs for inputs of `shape` to the layer's pool.

        With `like` (an input of that shape), `r` takes its memory layout, so that adding the
        mask to a features-first input is a plain elementwise pass.
        """
        layer = self._layers[layer_id]
        pool = layer.pools.setdefault(tuple(shape), deque())
        for _ in range(pairs):
            start = time.perf_counter()
            pair = self._draw(layer, tuple(shape), like)
            self._offline.add(time.perf_counter() - start, pair)
            pool.append(pair)

    def take(self, layer_id: str, shape: tuple[int, ...]) -> MaskPair:
        """A pair that was never handed out before; it leaves the pool for good."""
        layer = self._layers[layer_id]
        pool = layer.pools.get(tuple(shape))
        if pool:
            self._used += 1
            return pool.popleft()
        if self.policy is MaskPolicy.ERROR:
            raise MaskPoolExhausted(
                f"no input mask left for layer {layer_id!r} and input shape {tuple(shape)}",
                hint="fill more pairs per layer ahead of time, or use the 'refill' policy",
            )
        start = time.perf_counter()
        pair = self._draw(layer, tuple(shape))
        self._online.add(time.perf_counter() - start, pair)
        self._used += 1
        return pair

    def _draw(
        self, layer: _Layer, shape: tuple[int, ...], like: torch.Tensor | None = None
    ) -> MaskPair:
        if like is None or like.is_contiguous():
            r = torch.randn(shape, generator=self.generator, dtype=layer.weight.dtype)
        else:
            r = torch.empty_like(like, dtype=layer.weight.dtype).normal_(generator=self.generator)
        r.mul_(self.scale)
        with torch.no_grad():
            u = apply_op(layer.op, r, layer.weight)
        return MaskPair(r, u)

    def stats(self) -> dict[str, object]:
        left = sum(len(p) for layer in self._layers.values() for p in layer.pools.values())
        return {
            "policy": str(self.policy),
            "offline": self._offline.as_dict(),
            "online_refill": self._online.as_dict(),
            "used": self._used,
            "left": left,
        }
