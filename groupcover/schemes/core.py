"""The schemes of the benchmark's modes: plain offload (identity) and GroupCover."""

from __future__ import annotations

import weakref
from dataclasses import replace

import torch

from groupcover import obfuscate
from groupcover.errors import UsageError
from groupcover.layer_op import LayerOp
from groupcover.obfuscate import GroupedDemix
from groupcover.rng import SecretRandom
from groupcover.schemes.base import LayerSecret, Scheme, _add_bias, channel_dim_of


class IdentityScheme(Scheme):
    """Plain offload: the weight is published as is; the master only adds the bias."""

    name = "identity"

    def obfuscate(
        self, weight: torch.Tensor, bias: torch.Tensor | None, rng: SecretRandom
    ) -> tuple[torch.Tensor, LayerSecret]:
        kept = None if bias is None else bias.detach().clone()
        secret = LayerSecret(channel_dim_of(weight), weight.shape[0], bias=kept)
        return weight.detach().clone(), secret

    def prepare_input(self, x: torch.Tensor, secret: LayerSecret) -> torch.Tensor:
        return x

    def restore(
        self,
        y: torch.Tensor,
        secret: LayerSecret,
        mask_u: torch.Tensor | None = None,
        *,
        features_first: bool = False,
    ) -> torch.Tensor:
        # the transport hands over a fresh tensor: unmask and add the bias in place
        out = y.sub_(mask_u) if mask_u is not None else y
        return _add_bias(out, secret.bias, secret.channel_dim)


class GroupCoverScheme(Scheme):
    """GroupCover (ICML 2024): dissimilar row groups, dense mixing, input permutation."""

    name = "groupcover"
    takes_k = True

    def __init__(self, k: int = 4, cond_bound: float = obfuscate.DEFAULT_COND_BOUND) -> None:
        if k < 1 or k & (k - 1):
            raise UsageError(f"group size k={k} is not a power of two", hint="use k = 2, 4 or 8")
        self.k = k
        self.cond_bound = cond_bound
        # None: embedding_bag (torch's AVX2 kernel); else each secret's GroupedDemix, built once
        self._grouped: weakref.WeakKeyDictionary[LayerSecret, GroupedDemix] | None = (
            None if obfuscate.gather_kernel_is_vectorised() else weakref.WeakKeyDictionary()
        )

    def obfuscate(
        self, weight: torch.Tensor, bias: torch.Tensor | None, rng: SecretRandom
    ) -> tuple[torch.Tensor, LayerSecret]:
        layer = obfuscate.obfuscate_layer(weight.detach(), self.k, rng, cond_bound=self.cond_bound)
        kept = None if bias is None else bias.detach().to(torch.float32).clone()
        index, coef = obfuscate.restore_tables(layer.groups, layer.inverse)
        secret = LayerSecret(
            channel_dim=channel_dim_of(weight),
            out_features=weight.shape[0],
            in_perm=layer.in_perm,
            bias=kept,
            groups=layer.groups,
            inverse=layer.inverse,
            restore_index=index,
            restore_coef=coef,
        )
        return layer.published.to(weight.dtype), secret

    def worker_op(self, op: LayerOp) -> LayerOp:
        """Linear layers: features-first results, the layout the de-mixing gathers from."""
        if op.kind != "linear":
            return op
        return replace(op, params={**op.params, "transposed": 1})

    def prepare_input(self, x: torch.Tensor, secret: LayerSecret) -> torch.Tensor:
        """x with its features permuted, in x's own memory layout."""
        assert secret.in_perm is not None
        return obfuscate.permute_input(x, secret.in_perm, secret.channel_dim)

    def restore(
        self,
        y: torch.Tensor,
        secret: LayerSecret,
        mask_u: torch.Tensor | None = None,
        *,
        features_first: bool = False,
    ) -> torch.Tensor:
        assert secret.restore_index is not None and secret.restore_coef is not None
        return obfuscate.demix(
            y,
            secret.restore_index,
            secret.restore_coef,
            secret.bias,
            secret.channel_dim,
            mask_u,
            features_first_out=features_first,
            grouped=self._grouped_tables(secret),
        )

    def use_grouped_kernel(self, grouped: bool) -> None:
        """Force the de-mixing kernel (tests, benchmarks); the default follows the CPU."""
        self._grouped = weakref.WeakKeyDictionary() if grouped else None

    def _grouped_tables(self, secret: LayerSecret) -> GroupedDemix | None:
        if self._grouped is None or secret.groups is None or secret.inverse is None:
            return None
        tables = self._grouped.get(secret)
        if tables is None:
            tables = GroupedDemix.from_groups(secret.groups, secret.inverse, secret.bias)
            self._grouped[secret] = tables
        return tables
