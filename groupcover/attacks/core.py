"""What an attack sees, what it returns, and how a reconstruction is scored.

The attacker holds the public pretrained weights, the published (obfuscated) weight of each
layer, the scheme's public parameters (its name and group size `k`) and the payloads the worker
received in the mode under attack; it also runs the public model on texts of its own. It never
sees the victim's weights or the scheme's secrets: those are used only to score the result.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch

PLAUSIBLE = 0.25  # a fine-tune moves a layer by a few percent: farther than this is a failure


@dataclass(frozen=True)
class LayerView:
    """One offloaded layer as the attacker sees it (float64, original shapes (out, in))."""

    name: str
    public: torch.Tensor
    published: torch.Tensor
    k: int = 4
    scheme: str = ""
    payloads: torch.Tensor | None = None  # (N, in): what the worker received for this layer
    public_inputs: torch.Tensor | None = None  # (M, in): public model, the attacker's own texts
    public_same_inputs: torch.Tensor | None = None  # (N, in): public model, the payloads' texts
    cache: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)


@dataclass(frozen=True)
class Reconstruction:
    """The attacker's estimate of the victim's weight, rows and columns in the original order.

    `in_perm[c]` is the original input feature the attacker believes published column c holds.
    """

    weight: torch.Tensor
    in_perm: torch.Tensor | None = None


class Attack(ABC):
    """One attack: a published layer (plus what else the attacker holds) -> a reconstruction.

    `None` means the attack does not apply (or gave up): the attacker keeps the public weight.
    """

    name: str = ""
    description: str = ""
    uses_payloads = False

    @abstractmethod
    def run(self, view: LayerView) -> Reconstruction | None: ...


def anchor(
    weight: torch.Tensor, public: torch.Tensor, plausible: float = PLAUSIBLE
) -> torch.Tensor:
    """The attacker's own sanity step, using only what it knows.

    A reconstruction farther than `plausible` (relative) from the public weight, or not finite,
    is a failure (a fine-tune moves a layer by a few percent): the public weight is kept.
    """
    if not bool(torch.isfinite(weight).all()):
        return public.clone()
    if float((weight - public).norm()) > plausible * float(public.norm()):
        return public.clone()
    return weight


def error_ratio(rec: torch.Tensor, victim: torch.Tensor, public: torch.Tensor) -> float:
    """||W_rec - W_vic|| / ||W_pub - W_vic||: below 1, the attacker learned the fine-tuning."""
    return float((rec - victim).norm() / (public - victim).norm().clamp(min=1e-30))


def delta_cosine(rec: torch.Tensor, victim: torch.Tensor, public: torch.Tensor) -> float:
    """cos(W_rec - W_pub, W_vic - W_pub); 0 when the attacker kept the public weight."""
    a, b = (rec - public).flatten(), (victim - public).flatten()
    denom = float(a.norm() * b.norm())
    return 0.0 if denom == 0.0 else float(a @ b) / denom


def perm_accuracy(estimate: torch.Tensor | None, truth: torch.Tensor | None) -> float | None:
    """Fraction of published columns whose original feature the attacker got right."""
    if estimate is None or truth is None or estimate.numel() != truth.numel():
        return None
    return float((estimate == truth).double().mean())
