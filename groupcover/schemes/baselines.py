"""Baseline schemes the security evaluation attacks, each labelled with its source.

- `permutation`: plain shuffling of output rows and input features.
- `shadownet`: ShadowNet (Sun et al., IEEE S&P 2023), channel scaling + shuffling.
- `soter`: SOTER (Shen et al., USENIX ATC 2022), a secret subset of layers scaled by a secret
  scalar, the others offloaded as they are.
- `nnsplitter`: NNSplitter (Zhou et al., ICML 2023), a few (large) weights perturbed, the
  perturbation kept in the TEE.
- `groupcover-paper`: GroupCover (Zhang et al., ICML 2024) as published: deterministic
  dissimilarity grouping, integer mixing 1..99, k = 4 by default.

These are "-style" re-implementations of each scheme's obfuscation of one layer (what the worker
sees), not of their whole systems (integrity checks, training-time parts). Every secret is drawn
through the `SecretRandom` methods (`groupcover.schemes._rng`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from groupcover import obfuscate
from groupcover.schemes._rng import SecretRandomLike, as_secret_random
from groupcover.schemes.base import LayerSecret, Scheme, _add_bias, channel_dim_of
from groupcover.schemes.core import GroupCoverScheme


@dataclass(frozen=True, eq=False)
class RowSecret(LayerSecret):
    """Output i is `y''[out_index[i]] * out_scale[i]` (either may be None) plus the bias."""

    out_index: torch.Tensor | None = None
    out_scale: torch.Tensor | None = None
    source: str = ""

    def tensors(self) -> dict[str, torch.Tensor]:
        named = super().tensors()
        if self.out_index is not None:
            named["output permutation"] = self.out_index
        if self.out_scale is not None:
            named["output scales"] = self.out_scale
        return named


def _scale_view(scale: torch.Tensor, y: torch.Tensor, channel_dim: int) -> torch.Tensor:
    shape = [1] * y.dim()
    shape[channel_dim] = -1
    return scale.to(y.dtype).view(shape)


class RowScheme(Scheme):
    """Shared by the shuffling/scaling baselines: row permutation, row scales, input permutation."""

    source = ""

    def published_and_secret(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        rng: SecretRandomLike,
        *,
        shuffle_rows: bool,
        shuffle_inputs: bool,
        scales: torch.Tensor | None,
    ) -> tuple[torch.Tensor, RowSecret]:
        out_features, in_features = weight.shape[0], weight.shape[1]
        rows = weight.detach().to(torch.float64)
        row_perm = rng.randperm(out_features) if shuffle_rows else None  # published j = W[sigma j]
        in_perm = rng.randperm(in_features) if shuffle_inputs else None
        published = rows if row_perm is None else rows.index_select(0, row_perm)
        if scales is not None:
            published = published * scales.view(-1, *([1] * (weight.dim() - 1)))
        if in_perm is not None:
            published = published.index_select(1, in_perm)
        out_index = None if row_perm is None else torch.argsort(row_perm)
        out_scale = None
        if scales is not None:
            inverse = 1.0 / scales
            out_scale = (inverse if out_index is None else inverse[out_index]).to(torch.float32)
        kept = None if bias is None else bias.detach().to(torch.float32).clone()
        secret = RowSecret(
            channel_dim=channel_dim_of(weight),
            out_features=out_features,
            in_perm=in_perm,
            bias=kept,
            out_index=out_index,
            out_scale=out_scale,
            source=self.source,
        )
        return published.to(weight.dtype).contiguous(), secret

    def prepare_input(self, x: torch.Tensor, secret: LayerSecret) -> torch.Tensor:
        if secret.in_perm is None:
            return x
        return x.index_select(secret.channel_dim, secret.in_perm)

    def restore(
        self,
        y: torch.Tensor,
        secret: LayerSecret,
        mask_u: torch.Tensor | None = None,
        *,
        features_first: bool = False,
    ) -> torch.Tensor:
        assert isinstance(secret, RowSecret)
        out = y.sub_(mask_u) if mask_u is not None else y
        dim = secret.channel_dim
        if secret.out_index is not None:
            out = out.index_select(dim, secret.out_index)
        if secret.out_scale is not None:
            out = out.mul_(_scale_view(secret.out_scale, out, dim))
        return _add_bias(out, secret.bias, dim)


class PermutationScheme(RowScheme):
    """Plain permutation: output rows and input features shuffled, nothing else."""

    name = "permutation"
    source = "plain permutation baseline (rows and input features shuffled)"

    def obfuscate(
        self, weight: torch.Tensor, bias: torch.Tensor | None, generator: Any
    ) -> tuple[torch.Tensor, LayerSecret]:
        rng = as_secret_random(generator)
        return self.published_and_secret(
            weight, bias, rng, shuffle_rows=True, shuffle_inputs=True, scales=None
        )


def _random_scales(rng: SecretRandomLike, count: int, low: float, high: float) -> torch.Tensor:
    """Magnitudes log-uniform in [low, high], random signs (float64)."""
    log = rng.uniform(count, torch.tensor(low).log().item(), torch.tensor(high).log().item())
    return log.exp() * rng.signs(count)


class ShadowNetScheme(RowScheme):
    """ShadowNet-style: every output channel scaled by a secret scalar, channels shuffled."""

    name = "shadownet"
    source = "ShadowNet (Sun et al., IEEE S&P 2023): channel scaling + shuffling"

    def obfuscate(
        self, weight: torch.Tensor, bias: torch.Tensor | None, generator: Any
    ) -> tuple[torch.Tensor, LayerSecret]:
        rng = as_secret_random(generator)
        scales = _random_scales(rng, weight.shape[0], 0.25, 4.0)
        return self.published_and_secret(
            weight, bias, rng, shuffle_rows=True, shuffle_inputs=True, scales=scales
        )


class SoterScheme(RowScheme):
    """SOTER-style: a secret half of the layers is morphed by one secret scalar; others go as is."""

    name = "soter"
    source = "SOTER (Shen et al., USENIX ATC 2022): a random subset of layers scaled"

    def __init__(self, fraction: float = 0.5) -> None:
        self.fraction = fraction

    def obfuscate(
        self, weight: torch.Tensor, bias: torch.Tensor | None, generator: Any
    ) -> tuple[torch.Tensor, LayerSecret]:
        rng = as_secret_random(generator)
        morphed = float(rng.uniform(1)[0]) < self.fraction
        scales = None
        if morphed:
            scales = _random_scales(rng, 1, 0.25, 4.0).expand(weight.shape[0]).clone()
        return self.published_and_secret(
            weight, bias, rng, shuffle_rows=False, shuffle_inputs=False, scales=scales
        )


@dataclass(frozen=True, eq=False)
class SplitSecret(LayerSecret):
    """The perturbation E (sparse, in the master): the true output is y'' - E x + b."""

    correction: torch.Tensor | None = None  # sparse COO (out, in), float32
    source: str = ""

    def tensors(self) -> dict[str, torch.Tensor]:
        named = super().tensors()
        if self.correction is not None:
            named["perturbation"] = self.correction.to_dense()
        return named


class NNSplitterScheme(Scheme):
    """NNSplitter-style: a small fraction of the largest weights is perturbed; E stays inside.

    Linear layers only (the correction `E x` is a sparse matmul on the master). `prepare_input`
    computes `E x` from the plaintext input, `restore` subtracts it.
    """

    name = "nnsplitter"
    source = "NNSplitter (Zhou et al., ICML 2023): a few perturbed weights kept in the TEE"

    def __init__(self, fraction: float = 0.005, magnitude: float = 3.0) -> None:
        self.fraction = fraction
        self.magnitude = magnitude
        self._pending: dict[int, torch.Tensor] = {}

    def obfuscate(
        self, weight: torch.Tensor, bias: torch.Tensor | None, generator: Any
    ) -> tuple[torch.Tensor, LayerSecret]:
        if weight.dim() != 2:
            raise ValueError("the nnsplitter baseline handles Linear layers only")
        rng = as_secret_random(generator)
        w = weight.detach().to(torch.float64)
        flat = w.abs().flatten()
        count = max(1, int(self.fraction * flat.numel()))
        candidates = torch.topk(flat, min(flat.numel(), 10 * count)).indices
        chosen = candidates[rng.randperm(candidates.numel())[:count]]
        values = _random_scales(rng, count, 1.0, 2.0) * self.magnitude * float(w.std())
        delta = torch.zeros_like(flat)
        delta[chosen] = values
        delta = delta.view_as(w)
        published = (w + delta).to(weight.dtype).contiguous()
        correction = delta.to(torch.float32).to_sparse_coo().coalesce()
        kept = None if bias is None else bias.detach().to(torch.float32).clone()
        secret = SplitSecret(-1, weight.shape[0], bias=kept, correction=correction,
                             source=self.source)  # fmt: skip
        return published, secret

    def prepare_input(self, x: torch.Tensor, secret: LayerSecret) -> torch.Tensor:
        assert isinstance(secret, SplitSecret) and secret.correction is not None
        rows = x.reshape(-1, x.shape[-1])
        correction = secret.correction.to(rows.dtype)
        fix = torch.sparse.mm(correction, rows.t()).t()  # (rows, out) = E x
        self._pending[id(secret)] = fix.reshape(*x.shape[:-1], -1)
        return x

    def restore(
        self,
        y: torch.Tensor,
        secret: LayerSecret,
        mask_u: torch.Tensor | None = None,
        *,
        features_first: bool = False,
    ) -> torch.Tensor:
        out = y.sub_(mask_u) if mask_u is not None else y
        fix = self._pending.pop(id(secret))
        out = out.sub_(fix.to(out.dtype))
        return _add_bias(out, secret.bias, -1)


def draw_integer_mixing(
    groups: torch.Tensor, rng: SecretRandomLike, cond_bound: float
) -> torch.Tensor:
    """(G, k, k): dense integer blocks from 1..99 with cond <= cond_bound, identity on padding."""
    n_groups, k = groups.shape
    sizes = (groups >= 0).sum(dim=1)
    mixing = torch.eye(k, dtype=torch.float64).repeat(n_groups, 1, 1)
    for size in sorted(set(sizes.tolist())):
        members = torch.nonzero(sizes == size).flatten()
        todo = torch.arange(members.numel())
        block = torch.empty(members.numel(), size, size, dtype=torch.float64)
        for _ in range(10_000):
            if todo.numel() == 0:
                break
            draw = rng.integers(obfuscate.MIX_LOW, obfuscate.MIX_HIGH + 1,
                                (todo.numel(), size, size)).to(torch.float64)  # fmt: skip
            block[todo] = draw
            todo = todo[~(torch.linalg.cond(draw) <= cond_bound)]
        else:
            raise ValueError(f"no {size}x{size} mixing with cond <= {cond_bound}")
        mixing[members, :size, :size] = block
    return mixing


class PaperGroupCoverScheme(GroupCoverScheme):
    """GroupCover exactly as published: the grouping is the deterministic dissimilarity pairing
    of the weight's rows (a public function of the weights), entries 1..99, rows kept in place.
    The only addition is the condition-number redraw needed for float32 exactness."""

    name = "groupcover-paper"
    source = (
        "GroupCover (Zhang et al., ICML 2024) as published: deterministic dissimilarity "
        "grouping, integer mixing 1..99, k = 4"
    )
    takes_k = True

    def obfuscate(
        self, weight: torch.Tensor, bias: torch.Tensor | None, generator: Any
    ) -> tuple[torch.Tensor, LayerSecret]:
        rng = as_secret_random(generator)
        w = weight.detach()
        out_features, in_features = w.shape[0], w.shape[1]
        rows = w.reshape(out_features, -1).to(torch.float64)
        groups = obfuscate.pad_groups(obfuscate.group_rows(rows, self.k), self.k)
        mixing = draw_integer_mixing(groups, rng, self.cond_bound)
        valid = groups >= 0
        mixed_rows = torch.empty_like(rows)
        mixed_rows[groups[valid]] = torch.bmm(mixing, rows[groups.clamp(min=0)])[valid]
        in_perm = rng.randperm(in_features)
        published = mixed_rows.reshape(w.shape).index_select(1, in_perm)
        inverse = torch.linalg.inv(mixing)
        index, coef = obfuscate.restore_tables(groups, inverse)
        kept = None if bias is None else bias.detach().to(torch.float32).clone()
        secret = LayerSecret(
            channel_dim=channel_dim_of(w),
            out_features=out_features,
            in_perm=in_perm,
            bias=kept,
            groups=groups,
            inverse=inverse,
            restore_index=index,
            restore_coef=coef,
        )
        return published.to(weight.dtype).contiguous(), secret
