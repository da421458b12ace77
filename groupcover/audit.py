"""The payload audit: watch every tensor that leaves the master and flag any secret in it.

`Audit.observe` is a `Transport` observer: it sees exactly what the worker sees, under whatever
layer id the payload travels. The master registers each offloaded layer's plaintext weight, bias
and `LayerSecret` at setup and, per call, the plaintext input, the input as prepared for the
published weight and the mask it used (`note_call`). The audit assumes nothing about which layer
a payload belongs to: every payload is checked against every registered layer.

What it catches (each is a test in tests/unit/test_audit.py with a deliberately broken scheme or
transport):
- a plaintext weight, whole or by rows, published or sent as a call payload, under any layer
  id: rows matched up to a scale and a sign (`direct` signatures), up to a permutation of the
  columns as well (`sorted` signatures: the sorted magnitudes of a row), as rows or as columns
  of the payload (a transposed weight), plus a cosine check of each published row against its
  own layer's rows (near-copies);
- a secret vector (input permutation, its inverse, bias, the restore tables' columns, the
  integrity vectors) in any row or column of a payload, up to scale and shift (affine: |Pearson|
  close to 1), and the mixing matrices or their inverses by rows;
- in masked modes: a payload equal to the mask or its product, a mask too weak to hide the
  input (the payload still correlates with the prepared input), a mask used twice;
- for the mask worker of the `-2w` modes (an `Audit` of its own, `mask_worker`): any payload
  that is not the mask r alone (r is what it must receive; x + r, or anything of x, is a leak
  there), besides every check above;
- in unmasked modes: the input reaching the worker in the clear or with its features only
  permuted ("input exposed").

It also measures, per input width, the leakage figure of masked payloads: the largest
|correlation| between a payload feature and the same feature of the prepared input over every
audited token, judged against the exact null distribution of that statistic for this size
(`groupcover.leakage`: flagged above the null's 99% quantile, with its p-value and the smallest
correlation this many tokens detect with 95% power), and the advantage of a simple
distinguisher that guesses which of two inputs a payload masks by distance.

Publish checks made ahead: a published weight is fixed when its package is made, so `protect
--baselines` runs the publish checks there, on the owner's machine, once (`publish_verdict`), and
seals each layer's verdict with the SHA-256 of the bytes it checked. A master given those
verdicts (`accept_verdicts`) hashes each publish payload and, when the digest matches, takes the
verdict instead of repeating the checks (minutes under emulation); any other payload is checked
in full. Call payloads are always checked live.

Cost: the checks run where `observe` runs. `enabled` switches the audit off for the benchmark's
timed forwards, which then pay one attribute test per payload; audited forwards are separate
and untimed, and `report()["check_s"]` says what the checks cost.

The matching itself (signature index of weight rows, bank of secret vectors) is
`groupcover.payload_match`; this module keeps the bookkeeping: layers, calls, verdicts, report.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from groupcover import leakage
from groupcover.leakage import CorrelationMeter
from groupcover.payload_match import (
    SecretBank,
    SignatureIndex,
    as_matrix,
    dtype_name,
    f64,
    fingerprint,
    nearly_equal,
    payload_views,
)
from groupcover.published import tensor_digest
from groupcover.schemes.base import LayerSecret

ROW_COSINE_LIMIT = 0.999  # a published row this close to a plaintext row of its layer is a leak
WEAK_MASK_SIGMAS = 8.0  # payload/input correlation above this many standard errors: weak mask


class MaskLike(Protocol):
    r: torch.Tensor
    u: torch.Tensor


@dataclass
class _Call:
    plain: torch.Tensor
    prepared: torch.Tensor
    mask: MaskLike | None


@dataclass
class _LayerRecord:
    weight: torch.Tensor
    bias: torch.Tensor | None
    secret: LayerSecret
    channel_dim: int
    vectors: dict[str, torch.Tensor]  # secret vectors, float64
    matrices: dict[str, torch.Tensor]  # (G, k, k) or (rows, k) secret tables, float64


def _flat_features(t: torch.Tensor, channel_dim: int) -> torch.Tensor:
    t = f64(t)
    if channel_dim != -1 and t.dim() > 2:
        t = t.movedim(channel_dim, -1)
    return t.reshape(-1, t.shape[-1])


@dataclass
class _Leakage:
    """Per-feature correlation of payloads with the prepared inputs (one input width), and a
    distance distinguisher's score: is a payload nearer its own input than another token's?"""

    meter: CorrelationMeter = field(default_factory=CorrelationMeter)
    wins: int = 0
    trials: int = 0

    @property
    def n(self) -> int:
        return self.meter.tokens

    def add(self, payload: torch.Tensor, prepared: torch.Tensor) -> None:
        if not payload.is_floating_point():  # residues mod 2^32: their signed values
            payload = payload.to(torch.float64)
        # Each call's payload is put on one scale (its own RMS) before it joins the pooled
        # correlation: payloads' scales differ between layers (masked ones are 2^31 wide), and
        # payloads of a large scale joining the rows of inputs far from the pooled mean would
        # widen the statistic's null well past the exact law the verdict uses (p ~ 1e-4
        # figures from perfect masks, measured). A scalar per call changes no payload's
        # dependence on its input.
        rms = float(payload.pow(2).mean().sqrt()) if payload.numel() else 0.0
        self.meter.add(payload / rms if rms > 0 else payload, prepared)
        if rms > 0:  # the distances below compare payloads and inputs on the inputs' scale
            payload = payload * (float(prepared.double().pow(2).mean().sqrt()) / rms)
        rows = payload.shape[0]
        if rows > 1:
            other = prepared.roll(1, dims=0)
            own = (payload - prepared).pow(2).sum(1)
            alien = (payload - other).pow(2).sum(1)
            self.wins += int((own < alien).sum()) + int((own == alien).sum()) // 2
            self.trials += rows

    def max_abs_correlation(self) -> float:
        return self.meter.max_abs_correlation()

    def advantage(self) -> float:
        return 0.0 if self.trials == 0 else abs(2.0 * self.wins / self.trials - 1.0)


def _fixed_point_of(payload: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether integer payloads are x itself in fixed point: round(c x) for one c > 0 (the
    masked modes' X with a zero mask), to within the rounding."""
    if payload.is_floating_point() or payload.shape != x.shape or x.numel() == 0:
        return False
    p, v = payload.to(torch.float64).reshape(-1), x.to(torch.float64).reshape(-1)
    norm = float(v @ v)
    if norm == 0.0:
        return bool((p == 0).all())
    c = float(p @ v) / norm
    return c > 0 and float((p - c * v).abs().max()) <= 1.0


def noise_floor(tokens: int, features: int) -> float:
    """The leakage figure a perfect mask typically scores at this size (the median of the
    null, `groupcover.leakage.noise_floor`; the verdict uses the null's high quantile)."""
    return leakage.noise_floor(tokens, features)


@dataclass
class Audit:
    mode: str = ""
    masked: bool | None = None  # None: taken from whether calls carry masks
    mask_worker: bool = False  # watches a mask worker: its payloads must be the masks r alone
    enabled: bool = True
    # the leakage verdict's false-positive rate: a perfect mask's figure is above the null's
    # (1 - alpha) quantile in a fraction alpha of audits (`groupcover.leakage`)
    alpha: float = leakage.DEFAULT_ALPHA
    payloads: int = 0
    bytes: int = 0
    check_s: float = 0.0
    _layers: dict[str, _LayerRecord] = field(default_factory=dict)
    _index: SignatureIndex = field(default_factory=SignatureIndex)
    _calls: dict[str, _Call] = field(default_factory=dict)
    _leaks: dict[str, int] = field(default_factory=dict)
    _mask_prints: dict[tuple[str, tuple[int, ...], str], str] = field(default_factory=dict)
    _leakage: dict[int, _Leakage] = field(default_factory=dict)
    _exposed: set[str] = field(default_factory=set)
    _audited_calls: int = 0
    _secret_bank: SecretBank | None = None
    # layer id -> (SHA-256, dtype name, leak messages) of publish checks made ahead
    _verdicts: dict[str, tuple[str, str, list[str]]] = field(default_factory=dict)
    verdicts_taken: int = 0

    # ---- what the master tells the audit -----------------------------------------------------

    def register_layer(
        self,
        layer_id: str,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        secret: LayerSecret,
        extra: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """A layer's plaintext and secrets; `extra` names further secret vectors or tables.

        The weight is kept as given (no float64 copy: the checks convert it when they run)."""
        w = weight.detach()
        vectors: dict[str, torch.Tensor] = {}
        matrices: dict[str, torch.Tensor] = {}
        named = {**secret.tensors(), **(extra or {})}
        if secret.restore_index is not None:
            named["restore index"] = secret.restore_index
        if secret.in_perm is not None:
            named["inverse input permutation"] = torch.argsort(secret.in_perm)
        if bias is not None:
            named["bias"] = bias
        if secret.inverse is not None:
            named["mixing"] = torch.linalg.inv(f64(secret.inverse))
        for name, tensor in named.items():
            t = f64(tensor)
            if t.dim() <= 1:
                vectors[name] = t.reshape(-1)
            elif t.dim() == 2 and name.startswith("restore"):
                matrices[name] = t
                for j in range(t.shape[1]):
                    vectors[f"{name} (column {j})"] = t[:, j].contiguous()
            elif t.dim() == 3 or name.startswith("restore"):
                matrices[name] = t
            else:
                matrices[name] = t
        self._layers[layer_id] = _LayerRecord(
            w, bias, secret, secret.channel_dim, vectors, matrices
        )
        self._secret_bank = None
        rows = w.reshape(w.shape[0], -1)
        self._index.add(f"{layer_id}: plaintext weight rows", rows)
        if rows.shape[0] > 1:
            self._index.add(f"{layer_id}: plaintext weight columns", rows.t())

    def note_call(
        self,
        layer_id: str,
        plain: torch.Tensor,
        prepared: torch.Tensor,
        mask: MaskLike | None,
    ) -> None:
        """What the next `run` payload of this layer must not reveal."""
        if self.enabled:
            self._calls[layer_id] = _Call(plain.detach(), prepared.detach(), mask)

    def publish_verdict(self, layer_id: str, tensor: torch.Tensor) -> dict[str, Any]:
        """Runs the publish checks on one published weight; returns what `accept_verdicts`
        takes: the SHA-256 and dtype of the bytes checked and the leak messages raised."""
        before = dict(self._leaks)
        self.observe("publish", layer_id, tensor)
        leaks = [m for m, n in self._leaks.items() if n != before.get(m, 0)]
        return {"sha256": tensor_digest(tensor), "dtype": dtype_name(tensor.dtype), "leaks": leaks}

    def accept_verdicts(self, verdicts: dict[str, dict[str, Any]]) -> None:
        """Publish checks made ahead (see the module's docstring), by layer id."""
        for layer_id, v in verdicts.items():
            self._verdicts[layer_id] = (str(v["sha256"]), str(v["dtype"]), list(v["leaks"]))

    def _take_verdict(self, layer_id: str, payload: torch.Tensor) -> bool:
        """Flags a matching verdict's leaks and says so; False: the payload is to be checked."""
        verdict = self._verdicts.get(layer_id)
        if verdict is None:
            return False
        digest, dtype_name, leaks = verdict
        dtype = _DTYPES.get(dtype_name)
        if dtype is None or not payload.is_floating_point():
            return False
        as_checked = payload.detach().to(dtype)
        if not torch.equal(as_checked.to(payload.dtype), payload):
            return False  # the payload carries bits the checked bytes do not
        if tensor_digest(as_checked) != digest:
            return False
        for message in leaks:
            self._flag(message)
        self.verdicts_taken += 1
        return True

    def for_mask_worker(self) -> Audit:
        """An audit of the mask worker beside this one's worker: the same publish verdicts,
        its own calls and figures (each worker is judged on what it alone receives)."""
        watcher = Audit(mode=f"{self.mode} (mask worker)", mask_worker=True, alpha=self.alpha)
        watcher._verdicts = dict(self._verdicts)
        return watcher

    # ---- the observer --------------------------------------------------------------------------

    def observe(self, event: str, layer_id: str, tensor: torch.Tensor) -> None:
        if not self.enabled:
            return
        start = time.perf_counter()
        self.payloads += 1
        self.bytes += tensor.numel() * tensor.element_size()
        if event == "publish" and self._take_verdict(layer_id, tensor):
            self.check_s += time.perf_counter() - start
            return
        call = self._calls.pop(layer_id, None) if event == "run" else None
        self._check_weights(event, layer_id, tensor)
        self._check_secrets(event, layer_id, tensor)
        if event == "run" and call is not None:
            self._check_call(layer_id, tensor, call)
        self.check_s += time.perf_counter() - start

    def _flag(self, message: str) -> None:
        self._leaks[message] = self._leaks.get(message, 0) + 1

    def _check_weights(self, event: str, layer_id: str, payload: torch.Tensor) -> None:
        record = self._layers.get(layer_id)
        if event == "publish" and record is not None:
            if nearly_equal(payload, record.weight):
                self._flag(f"{layer_id}: published weight equals the plaintext weight")
                return
            cosine = _max_row_cosine(payload, record.weight)
            if cosine > ROW_COSINE_LIMIT:
                self._flag(
                    f"{layer_id}: a published row matches a plaintext weight row (cos {cosine:.4f})"
                )
                return
        for view, m in payload_views(payload):
            for kind, how in (("direct", "up to scale"), ("sorted", "up to scale and order")):
                for label in sorted(self._index.matches(kind, m)):
                    self._flag(f"{layer_id}: {event} payload {view} reproduce {label} ({how})")

    def _check_secrets(self, event: str, layer_id: str, payload: torch.Tensor) -> None:
        views = [m for _, m in payload_views(payload)]
        flat = f64(payload).reshape(1, -1)
        for view in [*views, flat]:
            for owner, name in self._bank().hits(view):
                where = "" if owner == layer_id else f" of layer {owner}"
                self._flag(f"{layer_id}: {event} payload contains the {name}{where}")
        if payload.dim() >= 1 and payload.shape[-1] in self._bank().table_widths():
            for owner, name in self._bank().table_hits(payload):
                where = "" if owner == layer_id else f" of layer {owner}"
                self._flag(f"{layer_id}: {event} payload contains rows of the {name}{where}")

    def _bank(self) -> SecretBank:
        if self._secret_bank is None:
            bank = SecretBank()
            for owner, record in self._layers.items():
                for name, vector in record.vectors.items():
                    bank.add_vector(owner, name, vector)
                for name, table in record.matrices.items():
                    bank.add_table(owner, name, table)
            self._secret_bank = bank
        return self._secret_bank

    def _check_call(self, layer_id: str, payload: torch.Tensor, call: _Call) -> None:
        self._audited_calls += 1
        record = self._layers.get(layer_id)
        channel_dim = record.channel_dim if record is not None else -1
        if call.mask is None:
            self._check_unmasked(layer_id, payload, call)
        else:
            self._check_masked(layer_id, payload, call)
        if payload.shape == call.prepared.shape:
            p = _flat_features(payload, channel_dim)
            x = _flat_features(call.prepared, channel_dim)
            stat = self._leakage.setdefault(p.shape[1], _Leakage())
            stat.add(p, x)

    def _check_unmasked(self, layer_id: str, payload: torch.Tensor, call: _Call) -> None:
        if nearly_equal(payload, call.plain):
            self._exposed.add(layer_id)
            self._flag(f"{layer_id}: input exposed: run payload is the plaintext input")
            return
        plain = as_matrix(call.plain)
        rows = as_matrix(payload)
        if rows.shape[1] == plain.shape[1] and rows.shape[0] == plain.shape[0]:
            index = SignatureIndex()
            index.add("input", plain)
            if index.matches("sorted", rows):
                self._exposed.add(layer_id)
                self._flag(
                    f"{layer_id}: input exposed: run payload is the input with its features "
                    "permuted"
                )
                return
        if payload.shape == call.prepared.shape and _correlation(payload, call.prepared) > 0.5:
            self._exposed.add(layer_id)
            self._flag(f"{layer_id}: input exposed: run payload correlates with the input")

    def _check_masked(self, layer_id: str, payload: torch.Tensor, call: _Call) -> None:
        assert call.mask is not None
        r, u = call.mask.r, call.mask.u
        if (nearly_equal(payload, call.plain) or nearly_equal(payload, call.prepared)
                or _fixed_point_of(payload, call.prepared)):  # fmt: skip
            self._flag(f"{layer_id}: run payload equals the unmasked input")
            return
        if self.mask_worker:
            if r.shape != payload.shape or _max_abs(payload, r) != 0.0:
                self._flag(f"{layer_id}: the mask worker's payload is not the mask r alone")
        elif r.shape == payload.shape and _max_abs(payload, r) <= 1e-3 * _max_abs(call.prepared):
            self._flag(f"{layer_id}: run payload equals the mask r (the input is not in it)")
        if nearly_equal(payload, u):
            self._flag(f"{layer_id}: run payload equals the mask product u")
        stamp = fingerprint(r)
        first = self._mask_prints.get(stamp)
        if first is not None:
            self._flag(f"{layer_id}: a mask was used twice (first by {first})")
        else:
            self._mask_prints[stamp] = layer_id
        if payload.shape == call.prepared.shape:
            corr = _correlation(payload, call.prepared)
            limit = WEAK_MASK_SIGMAS / math.sqrt(max(payload.numel(), 1))
            if corr > limit:
                self._flag(
                    f"{layer_id}: mask too weak: the run payload correlates with the input "
                    f"(|r| {corr:.3f} > {limit:.3f})"
                )

    # ---- results --------------------------------------------------------------------------------

    @property
    def leaks(self) -> list[str]:
        return [
            f"{message} (x{count})" if count > 1 else message
            for message, count in self._leaks.items()
        ]

    def leakage(self) -> list[dict[str, Any]]:
        """Per input width: the leakage figure of the audited payloads judged against the null
        for this size (`leakage.correlation_verdict`: the null's median as `noise_floor`, its
        (1 - alpha) quantile, the p-value, `above_null`, and the |correlation| this many tokens
        detect with 95% power)."""
        out = []
        for width, stat in sorted(self._leakage.items()):
            if stat.n < 3:
                continue
            figure = stat.max_abs_correlation()
            out.append({
                "features": width,
                "tokens": stat.n,
                "max_abs_correlation": figure,
                **leakage.correlation_verdict(figure, stat.n, width, self.alpha),
                "distinguisher_advantage": stat.advantage(),
                "distinguisher_trials": stat.trials,
            })  # fmt: skip
        return out

    def report(self) -> dict[str, object]:
        masked = self.masked
        rows = self.leakage()
        return {
            "mode": self.mode,
            "mask_worker": self.mask_worker,
            "payloads": self.payloads,
            "bytes": self.bytes,
            "leaks": self.leaks,
            "input_exposed": bool(self._exposed),
            "masked": masked,
            "audited_calls": self._audited_calls,
            "check_s": self.check_s,
            "publish_verdicts_taken": self.verdicts_taken,
            "leakage": rows,
            # a statistical verdict, apart from `leaks` (the exact checks): a perfect mask is
            # above the null in a fraction `alpha` of audits per input width
            "correlation_above_null": any(row["above_null"] for row in rows),
        }


_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
           "bfloat16": torch.bfloat16}  # fmt: skip


def _max_row_cosine(payload: torch.Tensor, weight: torch.Tensor) -> float:
    """The largest |cosine| of a payload row with a weight row. The unit rows are normalised in
    float64 and multiplied in float32: the product's error (< 1e-6 for rows of a few thousand
    entries) is far below the 1e-3 margin of `ROW_COSINE_LIMIT`, at half the cost."""
    rows, reference = as_matrix(payload), as_matrix(weight)
    if rows.shape[1] != reference.shape[1]:
        return 0.0
    unit_rows = F.normalize(rows, dim=1).to(torch.float32)
    unit_reference = F.normalize(reference, dim=1).to(torch.float32)
    return float((unit_rows @ unit_reference.t()).abs().max())


def _max_abs(a: torch.Tensor, b: torch.Tensor | None = None) -> float:
    d = f64(a) if b is None else f64(a) - f64(b)
    return float(d.abs().max()) if d.numel() else 0.0


def _correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    """|Pearson| of two same-shaped tensors taken as flat samples."""
    x = f64(a).reshape(-1)
    y = f64(b).reshape(-1)
    x = x - x.mean()
    y = y - y.mean()
    denom = float(x.norm() * y.norm())
    return 0.0 if denom == 0.0 else abs(float(x @ y) / denom)
