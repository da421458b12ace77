"""The payload audit: watch every tensor that leaves the master and flag any secret in it.

`Audit.observe` is a `Transport` observer. The master registers each offloaded layer's plaintext
weight, bias and `LayerSecret` at setup, and, per call, the plaintext input and the mask it used.
Checks on `publish` payloads: equal to the plaintext weight, any row with cosine > 0.999 to a row
of the plaintext weight (this also catches a fused or shuffled copy), or a secret (bias,
permutation, mixing inverse, restore table) equal to the payload or to one of its rows/columns.
Checks on `run` payloads: equal to the plaintext input, to `r` or `u`, or to a secret; in masked
modes also equal to the permuted but unmasked input. Plain offload publishes plaintext weights by
design, so its report lists leaks; GroupCover's must be empty.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from groupcover.masks import MaskPair
from groupcover.scheme import LayerSecret

ROW_COSINE_LIMIT = 0.999


@dataclass
class _LayerRecord:
    weight: torch.Tensor
    bias: torch.Tensor | None
    secret: LayerSecret
    mixing: torch.Tensor | None  # the inverse of the kept inverse: the mixing matrices themselves


@dataclass
class _Call:
    plain: torch.Tensor
    prepared: torch.Tensor
    mask: MaskPair | None


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.numel() != b.numel() or a.numel() == 0:
        return False
    a = a.detach().reshape(-1).to(torch.float64)
    b = b.detach().reshape(-1).to(torch.float64)
    scale = max(float(b.abs().max()), 1e-12)
    return bool((a - b).abs().max() <= 1e-5 * scale)


def _mask_only(payload: torch.Tensor, r: torch.Tensor, prepared: torch.Tensor) -> bool:
    """The payload is the mask alone: what it adds to r is nothing at the input's own scale
    (masks are far larger than the input, so a test relative to r's scale would always hit)."""
    if payload.shape != r.shape:
        return False
    rest = (payload.detach().to(torch.float64) - r.detach().to(torch.float64)).abs().max()
    scale = max(float(prepared.detach().abs().max()), 1e-12)
    return bool(rest <= 1e-5 * scale)


def _as_matrix(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().to(torch.float64)
    return t.reshape(1, -1) if t.dim() <= 1 else t.reshape(t.shape[0], -1)


def _contains_vector(payload: torch.Tensor, vector: torch.Tensor) -> bool:
    """The vector equals the payload, or one of its rows or columns (2-D view)."""
    if vector.numel() < 2 or bool((vector == vector.reshape(-1)[0]).all()):
        return False  # a constant vector would match any constant row
    if _close(payload, vector):
        return True
    matrix, v = _as_matrix(payload), vector.detach().reshape(-1).to(torch.float64)
    scale = max(float(v.abs().max()), 1e-12) * 1e-5
    if matrix.shape[1] == v.numel() and bool(((matrix - v).abs().amax(dim=1) <= scale).any()):
        return True
    if matrix.shape[0] == v.numel():
        return bool(((matrix - v.unsqueeze(1)).abs().amax(dim=0) <= scale).any())
    return False


def _contains_matrix_rows(payload: torch.Tensor, matrices: torch.Tensor) -> bool:
    """The payload equals the (G, k, k) matrices, or a payload row equals a non-trivial row."""
    if _close(payload, matrices):
        return True
    k = matrices.shape[-1]
    if payload.shape[-1] != k or k < 2:
        return False
    rows = matrices.reshape(-1, k)
    rows = rows[(rows != 0).sum(dim=1) > 1]  # identity rows of padded slots match too much
    candidates = payload.detach().reshape(-1, k).to(torch.float64)
    if rows.numel() == 0 or candidates.numel() == 0:
        return False
    distance = torch.cdist(candidates, rows)
    scale = rows.abs().amax(dim=1).clamp(min=1e-12)
    return bool((distance <= 1e-5 * scale).any())


def _max_row_cosine(payload: torch.Tensor, weight: torch.Tensor) -> float:
    rows, reference = _as_matrix(payload), _as_matrix(weight)
    if rows.shape[1] != reference.shape[1]:
        return 0.0
    cos = F.normalize(rows.float(), dim=1) @ F.normalize(reference.float(), dim=1).t()
    return float(cos.abs().max())


@dataclass
class Audit:
    mode: str = ""
    payloads: int = 0
    bytes: int = 0
    _layers: dict[str, _LayerRecord] = field(default_factory=dict)
    _calls: dict[str, _Call] = field(default_factory=dict)
    _leaks: dict[str, int] = field(default_factory=dict)

    def register_layer(
        self,
        layer_id: str,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        secret: LayerSecret,
    ) -> None:
        mixing = None if secret.inverse is None else torch.linalg.inv(secret.inverse)
        self._layers[layer_id] = _LayerRecord(weight.detach(), bias, secret, mixing)

    def note_call(
        self,
        layer_id: str,
        plain: torch.Tensor,
        prepared: torch.Tensor,
        mask: MaskPair | None,
    ) -> None:
        """What the next `run` payload of this layer must not reveal."""
        self._calls[layer_id] = _Call(plain.detach(), prepared.detach(), mask)

    def observe(self, event: str, layer_id: str, tensor: torch.Tensor) -> None:
        self.payloads += 1
        self.bytes += tensor.numel() * tensor.element_size()
        record = self._layers.get(layer_id)
        if record is None:
            return
        if event == "publish":
            self._check_publish(layer_id, tensor, record)
        elif event == "run":
            self._check_run(layer_id, tensor, record, self._calls.pop(layer_id, None))
        self._check_secrets(event, layer_id, tensor, record)

    def _flag(self, message: str) -> None:
        self._leaks[message] = self._leaks.get(message, 0) + 1

    def _check_publish(self, layer_id: str, payload: torch.Tensor, record: _LayerRecord) -> None:
        if _close(payload, record.weight):
            self._flag(f"{layer_id}: published weight equals the plaintext weight")
            return
        cosine = _max_row_cosine(payload, record.weight)
        if cosine > ROW_COSINE_LIMIT:
            self._flag(
                f"{layer_id}: a published row matches a plaintext weight row (cos {cosine:.4f})"
            )

    def _check_run(
        self, layer_id: str, payload: torch.Tensor, record: _LayerRecord, call: _Call | None
    ) -> None:
        if call is None:
            return
        if call.mask is None:
            return
        if _close(payload, call.plain) or _close(payload, call.prepared):
            self._flag(f"{layer_id}: run payload equals the unmasked input")
        if _mask_only(payload, call.mask.r, call.prepared):
            self._flag(f"{layer_id}: run payload equals the mask r")
        if _close(payload, call.mask.u):
            self._flag(f"{layer_id}: run payload equals the mask product u")

    def _check_secrets(
        self, event: str, layer_id: str, payload: torch.Tensor, record: _LayerRecord
    ) -> None:
        for name, secret in record.secret.tensors().items():
            if name == "bias" or secret.dim() > 1:
                found = _close(payload, secret)
            else:
                found = _contains_vector(payload, secret)
            if found:
                self._flag(f"{layer_id}: {event} payload contains the {name}")
        if record.bias is not None and _contains_vector(payload, record.bias):
            self._flag(f"{layer_id}: {event} payload contains the bias")
        for name, matrices in (
            ("mixing", record.mixing),
            ("inverse mixing", record.secret.inverse),
        ):
            if matrices is not None and _contains_matrix_rows(payload, matrices):
                self._flag(f"{layer_id}: {event} payload contains rows of the {name} matrices")

    @property
    def leaks(self) -> list[str]:
        return [
            f"{message} (x{count})" if count > 1 else message
            for message, count in self._leaks.items()
        ]

    def report(self) -> dict[str, object]:
        return {
            "mode": self.mode,
            "payloads": self.payloads,
            "bytes": self.bytes,
            "leaks": self.leaks,
        }
