"""How much a payload says about the input it hides, measured against the noise floor.

Two figures per masked layer (rows are tokens or positions, columns features):

- `max_abs_correlation(payload, inputs)`: the largest |Pearson correlation| between a payload
  feature and the input feature it carries, over all features. A payload independent of its
  input scores only the sampling noise of the estimate, `noise_floor(tokens, features)`: the
  same statistic on independent data of the same size (about 3 / sqrt(tokens) for 384 features:
  0.03 at 1e4 tokens, 0.0096 at 1e5). Float masks of the input's own scale score 0.2 to 0.6.
- `distinguisher_advantage(payload_a, payload_b)`: the advantage |P[say A | A] - P[say A | B]|
  of simple distinguishers told to tell payloads of one input (A) from payloads of another (B):
  a linear one (Gaussian naive Bayes: per-feature means and pooled variance, fitted on one half
  of the rows, scored on the other) and an energy one (the payload row's norm against the
  midpoint of the two classes' median norms). 0 for a perfect mask, up to sampling noise of
  about 1 / sqrt(rows).

`CorrelationMeter` accumulates the correlation over calls (sums in float64, centred by the first
chunk for precision) for a benchmark that sees the payloads one call at a time.
"""

from __future__ import annotations

import math

import torch


def _rows(t: torch.Tensor, feature_dim: int) -> torch.Tensor:
    """(rows, features) float64: the feature axis last, every other axis flattened into rows."""
    moved = t.detach().movedim(feature_dim, -1)
    return moved.reshape(-1, moved.shape[-1]).to(torch.float64)


class CorrelationMeter:
    """Per-feature Pearson correlation between payload and input, accumulated over chunks."""

    def __init__(self) -> None:
        self.tokens = 0
        self.features = 0
        self._shift: tuple[torch.Tensor, torch.Tensor] | None = None
        self._sums: list[torch.Tensor] = []

    def add(self, payload: torch.Tensor, inputs: torch.Tensor, feature_dim: int = -1) -> None:
        p, x = _rows(payload, feature_dim), _rows(inputs, feature_dim)
        if p.shape != x.shape:
            raise ValueError(f"payload {tuple(p.shape)} and input {tuple(x.shape)} differ")
        if self._shift is None:
            self._shift = (p.mean(dim=0), x.mean(dim=0))
            self.features = p.shape[1]
            self._sums = [torch.zeros(self.features, dtype=torch.float64) for _ in range(5)]
        p = p - self._shift[0]
        x = x - self._shift[1]
        for total, part in zip(
            self._sums,
            (p.sum(0), x.sum(0), (p * p).sum(0), (x * x).sum(0), (p * x).sum(0)),
            strict=True,
        ):
            total += part
        self.tokens += p.shape[0]

    def correlations(self) -> torch.Tensor:
        n = self.tokens
        if n < 2:
            raise ValueError("a correlation needs at least two rows")
        sp, sx, spp, sxx, spx = self._sums
        cov = spx / n - (sp / n) * (sx / n)
        var_p = (spp / n - (sp / n) ** 2).clamp(min=0)
        var_x = (sxx / n - (sx / n) ** 2).clamp(min=0)
        denominator = (var_p * var_x).sqrt()
        return torch.where(denominator > 0, cov / denominator, torch.zeros_like(cov))

    def max_abs_correlation(self) -> float:
        return float(self.correlations().abs().max())


def max_abs_correlation(
    payload: torch.Tensor, inputs: torch.Tensor, feature_dim: int = -1
) -> float:
    """max over features j of |corr(payload[:, j], inputs[:, j])| (features on `feature_dim`)."""
    meter = CorrelationMeter()
    meter.add(payload, inputs, feature_dim)
    return meter.max_abs_correlation()


def noise_floor(tokens: int, features: int, *, trials: int = 3, seed: int = 0) -> float:
    """The median over `trials` of `max_abs_correlation` between independent Gaussian data of
    the given size: what a payload that says nothing about its input scores."""
    generator = torch.Generator().manual_seed(seed)  # measurement noise, not a secret
    scores = []
    for _ in range(trials):
        meter = CorrelationMeter()
        left = tokens
        while left > 0:
            chunk = min(left, 16384)
            a = torch.randn(chunk, features, generator=generator, dtype=torch.float64)
            b = torch.randn(chunk, features, generator=generator, dtype=torch.float64)
            meter.add(a, b)
            left -= chunk
        scores.append(meter.max_abs_correlation())
    return sorted(scores)[len(scores) // 2]


def expected_noise_floor(tokens: int, features: int) -> float:
    """A closed form for `noise_floor`: the typical maximum of `features` |N(0, 1/tokens)|."""
    return math.sqrt(2.0 * math.log(2.0 * features)) / math.sqrt(tokens)


def _advantage(says_a_on_a: torch.Tensor, says_a_on_b: torch.Tensor) -> float:
    return abs(float(says_a_on_a.double().mean()) - float(says_a_on_b.double().mean()))


def distinguisher_advantage(
    payload_a: torch.Tensor, payload_b: torch.Tensor, feature_dim: int = -1
) -> float:
    """The better advantage of two simple distinguishers between payloads of input A and of
    input B (rows are samples): linear (Gaussian naive Bayes) and energy (row norm)."""
    a, b = _rows(payload_a, feature_dim), _rows(payload_b, feature_dim)
    half_a, half_b = a.shape[0] // 2, b.shape[0] // 2
    if min(half_a, half_b) < 1:
        raise ValueError("a distinguisher needs at least two rows of each class")
    train_a, test_a = a[:half_a], a[half_a:]
    train_b, test_b = b[:half_b], b[half_b:]
    mean_a, mean_b = train_a.mean(0), train_b.mean(0)
    var = torch.cat([train_a - mean_a, train_b - mean_b]).pow(2).mean(0).clamp(min=1e-300)
    direction = (mean_a - mean_b) / var
    midpoint = (mean_a + mean_b) / 2

    def linear(rows: torch.Tensor) -> torch.Tensor:
        return (rows - midpoint) @ direction > 0

    norm_a, norm_b = train_a.norm(dim=1).median(), train_b.norm(dim=1).median()
    threshold = (norm_a + norm_b) / 2
    a_is_larger = bool(norm_a >= norm_b)

    def energy(rows: torch.Tensor) -> torch.Tensor:
        larger = rows.norm(dim=1) > threshold
        return larger if a_is_larger else ~larger

    return max(
        _advantage(linear(test_a), linear(test_b)),
        _advantage(energy(test_a), energy(test_b)),
    )


def leakage_report(
    payload: torch.Tensor,
    inputs: torch.Tensor,
    contrast_payload: torch.Tensor | None = None,
    feature_dim: int = -1,
) -> dict[str, float]:
    """The figures for one layer: correlation, its noise floor for this size, and (with
    `contrast_payload`, the payloads of another input of the same shape) the advantage."""
    meter = CorrelationMeter()
    meter.add(payload, inputs, feature_dim)
    report = {
        "tokens": float(meter.tokens),
        "features": float(meter.features),
        "max_abs_corr": meter.max_abs_correlation(),
        "noise_floor": noise_floor(meter.tokens, meter.features),
    }
    if contrast_payload is not None:
        report["advantage"] = distinguisher_advantage(payload, contrast_payload, feature_dim)
    return report
