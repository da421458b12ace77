"""One-time input masks that hide: a pool of `(rho, U)` pairs per layer and shape.

The master blinds the (permuted) input with a fresh mask before the call and subtracts the
mask's product from the result, in fixed point modulo 2^32 (`groupcover.modular`): the input is
rounded to `X = round(x 2^22 / B)` (B a power-of-two bound on the layer's |input|, set once per
layer from calibration: the example inputs the pool is filled with, or the first live input),
the payload is `P = X + rho mod 2^32` as int32 with rho uniform on all of Z/2^32, so P is exactly
uniform whatever x is (a one-time pad, like Slalom's masks mod p), and it says nothing about x
however many bits of it are looked at. The worker computes `op(P, W'')` in float64 (the masked
layers are published in float64) and returns it in units of a public result quantum q, mod
2^32, as int32; the master subtracts `U = round(op(rho, W'') / q) mod 2^32` in wrapping int32
arithmetic, which leaves `op(X, W'') / q` to one quantum per element, and adds back
`2^32 op(k, W'') / q` for the few input elements where `X + rho` wrapped (probability about
|X| / 2^32 each; only the mask entries near +-2^31 can wrap, listed with each pair).
Four bytes each way per element, as float32 would take, at float64's exactness.

`U` is computed here, in the master, from the copy of the published weight it keeps for this
purpose alone; the worker never computes or sees it. Each pair is popped out of its pool on
`take`, and the pair itself hands out its tensors once (`MaskPair.consume`; a second call raises
`MaskReused`): no pair can serve twice. Filling ahead of time is the offline cost
(`stats()["offline"]`): drawing rho and the full local product per pair.

With a mask worker (the `-2w` modes) there are no pairs: `draw_mask` hands out a fresh `rho`
alone for one call, and a second worker, which sees only `rho`, computes `U` during the call
(`stats()["mask_worker"]`: the master's cost of drawing those masks, inside the forwards).

`refill_one` draws one missing pair at a time, for a background thread that refills the pools
while the master is idle (`groupcover.refill`); the pools' bookkeeping takes a lock, the
drawing itself does not (`stats()["idle_refill"]`).

When a pool runs dry the policy decides: `refill` (default) draws a fresh pair synchronously and
counts its time as online cost (`stats()["online_refill"]`); `error` raises `MaskPoolExhausted`.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum

import torch

from groupcover import kernels
from groupcover.errors import GroupCoverError
from groupcover.layer_op import RESIDUE_DTYPE, apply_op
from groupcover.modular import (
    EDGE_BITS,
    INPUT_BITS,
    check_range,
    correct_wraps,
    edges,
    guaranteed_peak,
    quantize,
    row_bounds,
    wraps,
)
from groupcover.rng import SecretRandom
from groupcover.tensorpass import abs_max, dense_layout
from groupcover.transport import LayerOp
from groupcover.wire.schema import output_shape

DEFAULT_INPUT_BOUND = 64.0  # B when a layer was never calibrated (a power of two)
MASK_DTYPE = torch.float64  # what masked layers are published and computed in
DEFAULT_MASK_SCALE = 1.0  # 0 models a broken mask (tests): rho = 0


class MaskPolicy(StrEnum):
    REFILL = "refill"
    ERROR = "error"


class MaskPoolExhausted(GroupCoverError):
    """A layer needed a mask for an input shape whose pool was empty, under the `error` policy."""


class MaskReused(GroupCoverError):
    """A mask pair was asked for its tensors a second time: a one-time mask used twice."""


class MaskPair:
    """One one-time mask: `r` = rho (int32, added to the fixed-point input mod 2^32) and `u` =
    U, its product in result quanta mod 2^32 (int32, subtracted from the worker's result);
    `edges` lists where rho can wrap. `consume()` hands them out once; `r`/`u` stay readable
    for audits."""

    __slots__ = ("_used", "edges", "r", "u")

    def __init__(self, r: torch.Tensor, u: torch.Tensor, edges: torch.Tensor | None = None) -> None:
        self.r = r
        self.u = u
        self.edges = edges
        self._used = False

    @property
    def used(self) -> bool:
        return self._used

    def consume(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._used:
            raise MaskReused(
                "a one-time mask pair was used twice",
                hint="take a fresh pair from the pool for every call",
            )
        self._used = True
        return self.r, self.u

    def __repr__(self) -> str:
        state = "used" if self._used else "fresh"
        return f"MaskPair({tuple(self.r.shape)}, {self.r.dtype}, {state})"


@dataclass
class _Cost:
    seconds: float = 0.0
    pairs: int = 0
    bytes: int = 0

    def add(self, seconds: float, pair: MaskPair) -> None:
        self.seconds += seconds
        self.pairs += 1
        self.bytes += sum(t.numel() * t.element_size() for t in (pair.r, pair.u))
        if pair.edges is not None:
            self.bytes += pair.edges.numel() * pair.edges.element_size()

    def as_dict(self) -> dict[str, float]:
        return {"seconds": self.seconds, "pairs": self.pairs, "bytes": self.bytes}


@dataclass
class Blinded:
    """One masked call's payload and what the master keeps of it: the fixed-point input X (in
    the prepared input's dtype, exact integers) and the wrapped elements (memory-order
    positions in the payload, k), None when nothing wrapped."""

    payload: torch.Tensor
    fixed: torch.Tensor | None  # None: the fused pass computed `rhs` instead
    wraps: tuple[torch.Tensor, torch.Tensor] | None
    peak: float  # max |X|
    rhs: torch.Tensor | None = None  # the check's X . v / q per row (fused pass)


@dataclass
class Unblinded:
    """op(X, W'') in result quanta (float64; None after the fused pass), their max |.|, per
    output position the wraps corrected there (None: none), the layer's output (the quanta
    scaled, in its dtype) and the check's s . Z per row (fused pass)."""

    quanta: torch.Tensor | None
    peak: float
    wraps: torch.Tensor | None
    output: torch.Tensor
    lhs: torch.Tensor | None = None


@dataclass
class _Layer:
    weight: torch.Tensor | None  # the published W'' (the master's copy, for u only), or None:
    op: LayerOp
    bound: float | None  # B: a power of two >= |input| on calibration; None until set
    calibrated: bool = False
    pools: dict[tuple[int, ...], deque[MaskPair]] = field(default_factory=dict)
    loader: Callable[[], torch.Tensor] | None = None  # ... read W'' when needed (packages)
    weight_shape: tuple[int, ...] = ()
    strides: dict[tuple[int, ...], tuple[int, ...]] = field(default_factory=dict)  # r's layout
    row_bound: float | None = None  # max_j ||W''_j|| (`modular.row_bounds`), when needed
    kept: torch.Tensor | None = None  # W'' for the wraps' corrections (`_correction_weight`)

    def published(self) -> torch.Tensor:
        if self.weight is not None:
            return self.weight
        assert self.loader is not None
        return self.loader().to(MASK_DTYPE)


def power_of_two_at_least(value: float) -> float:
    """The smallest power of two >= value (value > 0), so that scaling by it is exact."""
    return 2.0 ** math.ceil(math.log2(value))


class MaskPool:
    def __init__(
        self,
        rng: SecretRandom,
        policy: MaskPolicy | str = MaskPolicy.REFILL,
        scale: float = DEFAULT_MASK_SCALE,
        *,
        budget_bytes: int | None = None,
    ) -> None:
        """`budget_bytes` bounds the pairs held ahead of time (None: no bound); a pair that
        would exceed it is not drawn ahead, and its call draws it online (`refill`)."""
        self.rng = rng
        self.policy = MaskPolicy(policy)
        self.scale = scale
        self.budget_bytes = budget_bytes
        self._layers: dict[str, _Layer] = {}
        self._offline = _Cost()
        self._online = _Cost()
        self._for_worker = _Cost()  # masks r whose u a mask worker computes (no product here)
        self._idle = _Cost()  # pairs drawn by a background refill (`refill_one`)
        self._lock = threading.Lock()  # the pools and counters (a refill thread adds to them)
        self._refill_weight: tuple[str, torch.Tensor | None] = ("", None)
        self._used = 0
        self._held = 0  # bytes of the pairs waiting in pools
        self._peak_held = 0
        self._skipped = 0  # pairs not drawn ahead because of the budget

    def register(
        self,
        layer_id: str,
        published_weight: torch.Tensor | None,
        op: LayerOp,
        *,
        bound: float | None = None,
        loader: Callable[[], torch.Tensor] | None = None,
        weight_shape: tuple[int, ...] = (),
    ) -> None:
        """A layer whose inputs get masks; `bound` (else calibrated) bounds its |input|.

        Either the published weight itself (kept in float64), or `loader` returning it when
        needed (a package's layer read from the master's copy of its published weights: no
        float64 copy of every layer is held) with its `weight_shape`.
        """
        kept = bound if bound is None else power_of_two_at_least(bound)
        weight = None
        if published_weight is not None:
            weight = published_weight.detach().to(MASK_DTYPE, copy=True)
            weight_shape = tuple(weight.shape)
        elif loader is None:
            raise ValueError("register needs the published weight or a loader")
        self._layers[layer_id] = _Layer(weight, op, kept, calibrated=bound is not None,
                                        loader=loader, weight_shape=weight_shape)  # fmt: skip

    def published_weight(self, layer_id: str) -> torch.Tensor:
        return self._layers[layer_id].published()

    def pair_bytes(self, layer_id: str, shape: tuple[int, ...]) -> int:
        """Bytes of one (rho, U) pair for inputs of `shape` (int32 both; its edge list aside)."""
        layer = self._layers[layer_id]
        out = output_shape(layer.op, tuple(shape), layer.weight_shape)
        return (math.prod(shape) + math.prod(out)) * RESIDUE_DTYPE.itemsize

    def layer_ids(self) -> list[str]:
        return list(self._layers)

    def bound(self, layer_id: str) -> float | None:
        return self._layers[layer_id].bound

    def input_scale(self, layer_id: str) -> float:
        """2^INPUT_BITS / B: an input x becomes X = round(x x this) (a power of two)."""
        layer = self._layers[layer_id]
        bound = DEFAULT_INPUT_BOUND if layer.bound is None else layer.bound
        return 2.0**INPUT_BITS / bound

    def exponent(self, layer_id: str) -> int:
        """c: the layer's result quantum is 2^c (public: its op carries it)."""
        return int(self._layers[layer_id].op.params["quantum"])

    def blind(
        self, layer_id: str, x: torch.Tensor, pair: MaskPair, check_v: torch.Tensor | None = None
    ) -> Blinded:
        """The payload P = X + rho mod 2^32 (int32, x's layout) for the prepared input x.

        X = round(x 2^22 / B); the input's size is checked against the layer's masked range
        (`modular.check_range`), and the elements where X + rho wrapped are found
        (`Blinded.wraps`, None on some calls). For a linear layer with `check_v` (the
        integrity check's v / q) the fused pass (`groupcover.kernels`) also gives the check's
        X . v per row and keeps no copy of X; otherwise X is kept (`Blinded.fixed`, x's
        dtype: exact integers) for the check."""
        layer = self._layers[layer_id]
        scale = self.input_scale(layer_id)
        rho = pair.r
        if layer.op.kind == "linear" and check_v is not None:
            fused = kernels.blind(x, scale, rho, pair.edges, check_v, EDGE_BITS)
            if fused is not None:
                payload, rhs, peak, widest, wrapped = fused
                if peak > guaranteed_peak(layer.op):
                    self._check_range(layer_id, layer, peak, None, widest)
                return Blinded(payload, None, wrapped, peak, rhs)
        fixed = quantize(x, scale)
        peak = abs_max(fixed)
        if not peak <= guaranteed_peak(layer.op):
            self._check_range(layer_id, layer, peak, fixed)
        payload = fixed.to(RESIDUE_DTYPE)
        wrapped = wraps(payload, rho, pair.edges, peak)
        payload.add_(rho)  # wraps around 2^32: two's complement
        return Blinded(payload, fixed, wrapped, peak)

    def _check_range(
        self,
        layer_id: str,
        layer: _Layer,
        peak: float,
        fixed: torch.Tensor | None,
        widest: float | None = None,
    ) -> None:
        if layer.row_bound is None:
            layer.row_bound = row_bounds(layer.published(), layer.op)
        check_range(layer_id, peak, fixed, layer.op, layer.row_bound, self.exponent(layer_id),
                    widest)  # fmt: skip

    def unblind(
        self,
        layer_id: str,
        y: torch.Tensor,
        u: torch.Tensor,
        blinded: Blinded,
        check_s: torch.Tensor | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> Unblinded:
        """op(X, W'') from the worker's residues y and the pair's u: y - u in wrapping int32
        (in place on y), plus the wraps' correction where some input element wrapped. For a
        linear layer with `check_s` (the integrity check's s) and a float32 output, one fused
        pass gives the output (`Unblinded.output`) and the check's s . Z per row; otherwise
        the quanta in float64 (`Unblinded.quanta`)."""
        layer = self._layers[layer_id]
        per_position = None
        if blinded.wraps is not None:
            positions, k = blinded.wraps
            kept = self._correction_weight(layer)
            exponent = self.exponent(layer_id)
            linear = layer.op.kind == "linear"
            if linear:
                per_position = kernels.correct(y, blinded.payload, positions, k, kept, exponent)
            if per_position is None:
                weight = kept.t() if linear else kept  # W'' (a view of the rows kept)
                per_position = correct_wraps(y, blinded.payload, positions, k, weight, layer.op,
                                             exponent)  # fmt: skip
        factor = self.output_factor(layer_id)
        if layer.op.kind == "linear" and check_s is not None and dtype == torch.float32:
            fused = kernels.unblind(y, u, check_s, factor)
            if fused is not None:
                output, lhs, peak = fused
                return Unblinded(None, peak, per_position, output, lhs)
        residues = y.sub_(u)
        quanta = residues.to(torch.float64)
        return Unblinded(quanta, abs_max(residues), per_position,
                         quanta.to(dtype).mul_(factor))  # fmt: skip

    @staticmethod
    def _correction_weight(layer: _Layer) -> torch.Tensor:
        """W'' for the wraps' corrections, made once (a call wraps somewhere most times): for
        a linear layer as W''^T rows, contiguous (one row per wrap: what the fused pass reads;
        the torch path reads its transposed view), for a convolution as it is."""
        if layer.kept is None:
            weight = layer.weight
            if weight is None:
                assert layer.loader is not None
                weight = layer.loader()
            transposed = weight.t() if layer.op.kind == "linear" else weight
            layer.kept = transposed.contiguous()
        return layer.kept

    def output_factor(self, layer_id: str) -> float:
        """q / (2^22 / B): what turns result quanta into the layer's output (a power of two)."""
        return 2.0 ** self.exponent(layer_id) / self.input_scale(layer_id)

    def calibrate(self, layer_id: str, x: torch.Tensor) -> None:
        """Sets the layer's input bound B from an input, once (later calls keep it: the fixed
        point must not follow each input; an input beyond the range is refused instead)."""
        layer = self._layers[layer_id]
        if layer.calibrated:
            return
        peak = abs_max(x.detach())
        layer.bound = power_of_two_at_least(max(peak, 2.0**-20))
        layer.calibrated = True

    def available(self, layer_id: str, shape: tuple[int, ...]) -> int:
        pool = self._layers[layer_id].pools.get(tuple(shape))
        return 0 if pool is None else len(pool)

    def fill(
        self, layer_id: str, shape: tuple[int, ...], pairs: int, like: torch.Tensor | None = None
    ) -> None:
        """Offline: add `pairs` fresh pairs for inputs of `shape` to the layer's pool.

        With `like` (an input of that shape), `r` takes its memory layout, so that adding the
        mask to a features-first input is a plain elementwise pass; `like` also calibrates the
        layer's input bound if it has none.
        """
        layer = self._layers[layer_id]
        shape = tuple(shape)
        if like is not None:
            self.calibrate(layer_id, like)
            self._note_layout(layer, shape, like)
        pool = layer.pools.setdefault(shape, deque())
        weight = None
        for _ in range(pairs):
            size = self.pair_bytes(layer_id, shape)
            if self.budget_bytes is not None and self._held + size > self.budget_bytes:
                self._skipped += 1
                continue
            start = time.perf_counter()
            if weight is None:
                weight = layer.published()  # one read for all of this layer's pairs
            pair = self._draw(layer_id, shape, like, weight)
            self._add(pool, pair, size, self._offline, time.perf_counter() - start)

    def _add(self, pool: deque[MaskPair], pair: MaskPair, size: int, cost: _Cost,
             seconds: float) -> None:  # fmt: skip
        with self._lock:
            cost.add(seconds, pair)
            pool.append(pair)
            self._held += size
            self._peak_held = max(self._peak_held, self._held)

    def refill_one(self, pairs: int = 1) -> bool:
        """Draws one pair for the first (layer, input shape) seen so far that has fewer than
        `pairs` ahead, within the budget; False when none is missing. Safe beside `take` on
        another thread: a background refill calls it in the master's idle time."""
        for layer_id, layer in list(self._layers.items()):
            for shape, pool in list(layer.pools.items()):
                size = self.pair_bytes(layer_id, shape)
                if len(pool) >= pairs or (
                    self.budget_bytes is not None and self._held + size > self.budget_bytes
                ):
                    continue
                start = time.perf_counter()
                if self._refill_weight[0] != layer_id:  # one read per layer, not per pair
                    self._refill_weight = (layer_id, layer.published())
                pair = self._draw(layer_id, shape, None, self._refill_weight[1])
                self._add(pool, pair, size, self._idle, time.perf_counter() - start)
                return True
        self._refill_weight = ("", None)  # all full: hold no extra copy while idle
        return False

    def top_up(self, pairs: int = 1) -> int:
        """Offline: every (layer, input shape) seen so far back to `pairs` pairs ahead, in the
        order the layers were registered, as far as the budget allows; returns pairs drawn."""
        before = self._offline.pairs
        for layer_id, layer in self._layers.items():
            for shape, pool in list(layer.pools.items()):
                missing = pairs - len(pool)
                if missing > 0:
                    self.fill(layer_id, shape, missing)
        return self._offline.pairs - before

    def known_shapes(self) -> int:
        return sum(len(layer.pools) for layer in self._layers.values())

    @staticmethod
    def _note_layout(layer: _Layer, shape: tuple[int, ...], like: torch.Tensor) -> None:
        if tuple(like.shape) == shape and dense_layout(like):
            layer.strides[shape] = tuple(like.stride())

    def take(
        self, layer_id: str, shape: tuple[int, ...], x: torch.Tensor | None = None
    ) -> MaskPair:
        """A pair that was never handed out before; it leaves the pool for good.

        `x` (the input the mask is for) calibrates a layer that has no bound yet, and gives a
        pair drawn online its memory layout.
        """
        layer = self._layers[layer_id]
        shape = tuple(shape)
        pool = layer.pools.setdefault(shape, deque())  # a shape seen online is topped up too
        if x is not None:
            self._note_layout(layer, shape, x)
        with self._lock:
            pair = pool.popleft() if pool else None
            if pair is not None:
                self._used += 1
                self._held -= self.pair_bytes(layer_id, shape)
        if pair is not None:
            return pair
        if self.policy is MaskPolicy.ERROR:
            raise MaskPoolExhausted(
                f"no input mask left for layer {layer_id!r} and input shape {tuple(shape)}",
                hint="fill more pairs per layer ahead of time, or use the 'refill' policy",
            )
        start = time.perf_counter()
        if x is not None:
            self.calibrate(layer_id, x)
        pair = self._draw(layer_id, tuple(shape), x)
        self._online.add(time.perf_counter() - start, pair)
        self._used += 1
        return pair

    def draw_mask(self, layer_id: str, shape: tuple[int, ...], x: torch.Tensor) -> MaskPair:
        """A fresh mask rho alone (its pair's u empty: not known yet), in x's layout, for one
        call whose U a mask worker computes: no product here. `x` (the input it is for)
        calibrates the layer once. Drawn on the spot, never pooled: each rho serves one call."""
        layer = self._layers[layer_id]
        shape = tuple(shape)
        self.calibrate(layer_id, x)
        self._note_layout(layer, shape, x)
        start = time.perf_counter()
        r = self._draw_r(layer_id, shape, x)
        pair = MaskPair(r, r[:0], edges(r))
        self._for_worker.add(time.perf_counter() - start, pair)
        self._used += 1
        return pair

    def _draw_r(
        self, layer_id: str, shape: tuple[int, ...], like: torch.Tensor | None
    ) -> torch.Tensor:
        layer = self._layers[layer_id]
        flat = self.rng.int32_uniform(math.prod(shape))  # uniform on all of Z/2^32
        if self.scale == 0:
            flat.zero_()  # a broken mask (tests)
        stride = layer.strides.get(shape)
        if like is not None and tuple(like.shape) == shape and dense_layout(like):
            stride = tuple(like.stride())
        # iid entries: any dense layout will do
        return flat.as_strided(shape, stride) if stride is not None else flat.view(shape)

    def _draw(
        self,
        layer_id: str,
        shape: tuple[int, ...],
        like: torch.Tensor | None = None,
        weight: torch.Tensor | None = None,
    ) -> MaskPair:
        layer = self._layers[layer_id]
        r = self._draw_r(layer_id, shape, like)
        with torch.no_grad():  # U = round(op(rho, W'') / q) mod 2^32: the op is quantized
            u = apply_op(layer.op, r, weight if weight is not None else layer.published())
        return MaskPair(r, u, edges(r))

    def stats(self) -> dict[str, object]:
        left = sum(len(p) for layer in self._layers.values() for p in layer.pools.values())
        return {
            "policy": str(self.policy),
            "offline": self._offline.as_dict(),
            "online_refill": self._online.as_dict(),
            "mask_worker": self._for_worker.as_dict(),
            "idle_refill": self._idle.as_dict(),
            "used": self._used,
            "left": left,
            "budget_bytes": self.budget_bytes,
            "held_bytes": self._held,
            "peak_held_bytes": self._peak_held,
            "not_drawn_ahead": self._skipped,
            "input_bits": INPUT_BITS,
            "dtype": "int32 residues mod 2^32 (computed in float64)",
            "input_bounds": {name: layer.bound for name, layer in self._layers.items()},
        }
