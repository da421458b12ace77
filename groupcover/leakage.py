"""How much a payload says about the input it hides, judged against the null distribution.

Two figures per masked layer (rows are tokens or positions, columns features):

- `max_abs_correlation(payload, inputs)`: the largest |Pearson correlation| between a payload
  feature and the input feature it carries, over all features. A payload independent of its
  input scores only sampling noise, whose distribution is known in closed form (the null, below).
  Float masks of the input's own scale score 0.2 to 0.6.
- `distinguisher_advantage(payload_a, payload_b)`: the advantage |P[say A | A] - P[say A | B]|
  of simple distinguishers told to tell payloads of one input (A) from payloads of another (B):
  a linear one (Gaussian naive Bayes: per-feature means and pooled variance, fitted on one half
  of the rows, scored on the other) and an energy one (the payload row's norm against the
  midpoint of the two classes' median norms). 0 for a perfect mask, up to sampling noise of
  about 1 / sqrt(rows).

The null, and what a verdict can see (`correlation_verdict`). With N rows, one feature's sample
correlation r between a payload column independent of its input column has r^2 ~ Beta(1/2,
(N - 2) / 2) whenever either column is i.i.d. Gaussian (the t test of a Pearson r); the tail
P(|r| >= c) is a regularized incomplete beta function, computed here exactly (`abs_corr_tail`).
Given the inputs, the payload columns of a hiding mask are independent of each other, so the
max over m features has the exact tail 1 - (1 - P(|r| >= c))^m (Sidak). The analytic null
replaces a median of three simulated draws, which is the null's *median*: half of all perfect
masks scored above it, and a figure 30% over it (0.159 against 0.122 at 576 tokens x 384
features) was within the null's 99% quantile (0.174; p = 0.048), not a leak. The masked
modes' payloads are uniform on the mask interval rather than Gaussian; for them the Beta law
holds to O(1/N) in the bulk, and in the tail a bounded payload against heavy-tailed inputs
only makes large |r| rarer (the correction goes with the product of the two excess kurtoses,
negative for a uniform payload), so the verdict's false-positive rate stays at or below
`alpha` (tests/unit/test_leakage.py checks both by simulation).

- `null_quantile(N, m, alpha)`: the (1 - alpha) quantile of the max |r| of a perfect mask; a
  figure above it is flagged, so a perfect mask is flagged in a fraction alpha of audits
  (`DEFAULT_ALPHA` = 1%). `noise_floor(N, m)` is the same null's median (the figure a perfect
  mask typically scores; kept for the reports that print it).
- `p_value(stat, N, m)`: the chance that a perfect mask scores at least `stat`.
- `detectable_correlation(N, m, alpha, power)`: the smallest planted |correlation| of one
  feature that the verdict flags with probability `power` (95%), from Fisher's z (atanh r is
  about N(atanh rho, 1 / (N - 3))) against the exact threshold. 0.24 at 576 tokens x 384
  features, 0.019 at 1e5 tokens: a small audit only rules out gross leaks.
- `tokens_to_detect(rho, m, alpha, power)`: the rows needed to detect `rho` with that power,
  ((z_{1 - a/2} + z_power) / atanh(rho))^2 + 3 with a the per-feature level: about 3.4e5 rows
  of 384 features for rho = 0.01 at alpha 1% (the audit watches more forwards with
  `--audit-forwards`).

`CorrelationMeter` accumulates the correlation over calls (sums in float64, centred by the first
chunk for precision) for a benchmark that sees the payloads one call at a time.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

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


DEFAULT_ALPHA = 0.01  # the verdict's false-positive rate: a perfect mask is flagged in 1% of audits
DEFAULT_POWER = 0.95  # the power `detectable_correlation` promises
TARGET_CORRELATION = 0.01  # the planted correlation the reports say the rows needed for


def _betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b) (Lentz's continued fraction, to
    1e-14 relative; the symmetry I_x(a, b) = 1 - I_{1-x}(b, a) where that converges faster)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    if x > (a + 1.0) / (a + b + 2.0):
        return 1.0 - _betainc(b, a, 1.0 - x)
    log_front = (
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    f = d
    for m in range(1, 10_000):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            f *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return math.exp(log_front) * f / a


def abs_corr_tail(c: float, tokens: int) -> float:
    """P(|r| >= c) for the Pearson r of `tokens` rows of independent columns (one Gaussian):
    I_{1 - c^2}((N - 2) / 2, 1 / 2)."""
    if tokens < 3:
        raise ValueError("the null of a correlation needs at least three rows")
    if c <= 0.0:
        return 1.0
    if c >= 1.0:
        return 0.0
    return _betainc((tokens - 2) / 2.0, 0.5, 1.0 - c * c)


def per_feature_level(alpha: float, features: int) -> float:
    """The per-feature level a with 1 - (1 - a)^m = alpha (Sidak: exact for independent
    features, as a hiding mask's payload columns are)."""
    return -math.expm1(math.log1p(-alpha) / features)


def p_value(stat: float, tokens: int, features: int) -> float:
    """P(max over `features` of |r| >= stat) for a payload independent of its input."""
    tail = abs_corr_tail(stat, tokens)
    return -math.expm1(features * math.log1p(-tail)) if tail < 1.0 else 1.0


def null_quantile(tokens: int, features: int, alpha: float = DEFAULT_ALPHA) -> float:
    """The (1 - alpha) quantile of max |r| over `features` for a payload independent of its
    input (exact, by bisection on the Beta tail)."""
    level = per_feature_level(alpha, features)
    low, high = 0.0, 1.0
    for _ in range(200):
        mid = (low + high) / 2
        if abs_corr_tail(mid, tokens) > level:
            low = mid
        else:
            high = mid
        if high - low < 1e-12:
            break
    return high


def noise_floor(tokens: int, features: int) -> float:
    """The median of max |r| over `features` for a payload independent of its input: what a
    perfect mask typically scores (half of all perfect masks score above it; the verdict uses
    `null_quantile`)."""
    return null_quantile(tokens, features, 0.5)


def expected_noise_floor(tokens: int, features: int) -> float:
    """A rough closed form for `noise_floor`: the typical maximum of `features` |N(0, 1/N)|."""
    return math.sqrt(2.0 * math.log(2.0 * features)) / math.sqrt(tokens)


_NORMAL = statistics.NormalDist()


def detectable_correlation(
    tokens: int, features: int, alpha: float = DEFAULT_ALPHA, power: float = DEFAULT_POWER
) -> float:
    """The planted |correlation| of one feature flagged with probability at least `power`: the
    exact threshold moved up by z_power standard errors of Fisher's z (atanh r ~ N(atanh rho,
    1 / (N - 3))), rounded up to two significant digits."""
    if tokens < 4:
        return 1.0
    threshold = null_quantile(tokens, features, alpha)
    z = math.atanh(min(threshold, 1.0 - 1e-15)) + _NORMAL.inv_cdf(power) / math.sqrt(tokens - 3)
    return _round_up(math.tanh(z))


def _round_up(value: float, digits: int = 2) -> float:
    """`value` rounded up to `digits` significant digits: Fisher's z puts the power at the
    unrounded value to within sampling error, so the figure a report promises is rounded up,
    never down (a claim of 95% power that holds, not one that holds half the time)."""
    if value <= 0.0 or value >= 1.0:
        return min(max(value, 0.0), 1.0)
    scale = 10.0 ** (digits - 1 - math.floor(math.log10(value)))
    return min(1.0, math.ceil(value * scale - 1e-9) / scale)


def tokens_to_detect(
    corr: float, features: int, alpha: float = DEFAULT_ALPHA, power: float = DEFAULT_POWER
) -> int:
    """Rows needed for `detectable_correlation` to reach `corr`: ((z_{1 - a/2} + z_power) /
    atanh(corr))^2 + 3, a the per-feature level."""
    level = per_feature_level(alpha, features)
    z = _NORMAL.inv_cdf(1.0 - level / 2.0) + _NORMAL.inv_cdf(power)
    return math.ceil((z / math.atanh(corr)) ** 2 + 3)


def correlation_verdict(
    stat: float,
    tokens: int,
    features: int,
    alpha: float = DEFAULT_ALPHA,
    power: float = DEFAULT_POWER,
) -> dict[str, Any]:
    """The judgement of one leakage figure: the null's median and (1 - alpha) quantile, the
    p-value, whether the figure is above the quantile, and what this size can detect."""
    threshold = null_quantile(tokens, features, alpha)
    return {
        "noise_floor": noise_floor(tokens, features),
        "null_quantile": threshold,
        "alpha": alpha,
        "p_value": p_value(stat, tokens, features),
        "above_null": stat > threshold,
        "detectable_corr": detectable_correlation(tokens, features, alpha, power),
        "power": power,
        "target_corr": TARGET_CORRELATION,
        "tokens_for_target": tokens_to_detect(TARGET_CORRELATION, features, alpha, power),
    }


def batched_max_abs_correlation(payload: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """max_j |r_j| of each of a batch of (trials, rows, features) pairs: (trials,)."""
    p = payload - payload.mean(dim=1, keepdim=True)
    x = inputs - inputs.mean(dim=1, keepdim=True)
    r = (p * x).sum(1) / (p.norm(dim=1) * x.norm(dim=1)).clamp(min=1e-300)
    return r.abs().amax(dim=1)


def simulated_null(
    tokens: int, features: int, *, trials: int, seed: int = 0, uniform: bool = False
) -> torch.Tensor:
    """`trials` draws of max |r| over `features` between independent data of `tokens` rows
    (a Gaussian payload, or a uniform one against heavy-tailed inputs, as a hiding mask's
    payloads against LayerNorm outputs with outlier features): a check of the analytic null."""
    generator = torch.Generator().manual_seed(seed)  # measurement noise, not a secret
    scores = []
    chunk = max(1, (1 << 22) // (tokens * features))
    for start in range(0, trials, chunk):
        shape = (min(chunk, trials - start), tokens, features)
        x = torch.randn(shape, generator=generator, dtype=torch.float64)
        if uniform:
            x = x.pow(3)
            p = torch.rand(shape, generator=generator, dtype=torch.float64)
        else:
            p = torch.randn(shape, generator=generator, dtype=torch.float64)
        scores.append(batched_max_abs_correlation(p, x))
    return torch.cat(scores)


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
) -> dict[str, Any]:
    """The figures for one layer: correlation, its judgement against the null for this size
    (`correlation_verdict`), and (with `contrast_payload`, the payloads of another input of the
    same shape) the advantage."""
    meter = CorrelationMeter()
    meter.add(payload, inputs, feature_dim)
    stat = meter.max_abs_correlation()
    report: dict[str, Any] = {
        "tokens": float(meter.tokens),
        "features": float(meter.features),
        "max_abs_corr": stat,
        **correlation_verdict(stat, meter.tokens, meter.features),
    }
    if contrast_payload is not None:
        report["advantage"] = distinguisher_advantage(payload, contrast_payload, feature_dim)
    return report
