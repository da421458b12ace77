"""The pluggable obfuscation scheme: one layer in, published weight plus master-side secrets out.

A scheme obfuscates one layer offline (`obfuscate`), transforms each input before it leaves the
master (`prepare_input`) and turns the worker's result back into the layer's true output
(`restore`). The benchmark's modes differ only by the scheme they name; baseline schemes
(ShadowNet-style scaling and shuffling, plain permutation) are one more class in `SCHEMES`.
"""

from __future__ import annotations

import weakref
from abc import ABC, abstractmethod
from dataclasses import dataclass, replace

import torch

from groupcover import obfuscate
from groupcover.errors import UsageError
from groupcover.obfuscate import GroupedDemix
from groupcover.rng import SecretRandom
from groupcover.transport import LayerOp, OpKind


@dataclass(frozen=True, eq=False)
class LayerSecret:
    """What the master keeps for one offloaded layer; nothing here is ever sent to the worker.

    `channel_dim` is the feature axis of inputs and outputs (-1 for linear, 1 for convolutions).
    `restore_index`/`restore_coef` (out, k) are the de-mixing in output order: output feature i
    is sum_j coef[i, j] * y[index[i, j]], plus `bias[i]`. `groups` (G, k, padded with -1) and
    `inverse` (G, k, k) are kept in their grouped form for audits and attacks.
    """

    channel_dim: int
    out_features: int
    in_perm: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    groups: torch.Tensor | None = None
    inverse: torch.Tensor | None = None
    restore_index: torch.Tensor | None = None
    restore_coef: torch.Tensor | None = None

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every secret tensor by name (for the payload audit)."""
        named = {
            "input permutation": self.in_perm,
            "bias": self.bias,
            "groups": self.groups,
            "inverse mixing": self.inverse,
            "restore coefficients": self.restore_coef,
        }
        return {name: tensor for name, tensor in named.items() if tensor is not None}


def op_for(module: torch.nn.Module) -> LayerOp | None:
    """The bias-free operation the worker runs for an offloadable module, else None."""
    if isinstance(module, torch.nn.Linear):
        return LayerOp("linear")
    if isinstance(module, torch.nn.Conv1d | torch.nn.Conv2d):
        plain = module.groups == 1 and module.padding_mode == "zeros"
        if not plain or isinstance(module.padding, str):
            return None
        kind: OpKind = "conv1d" if isinstance(module, torch.nn.Conv1d) else "conv2d"
        return LayerOp(
            kind,
            stride=tuple(module.stride),
            padding=tuple(module.padding),
            dilation=tuple(module.dilation),
        )
    return None


def channel_dim_of(weight: torch.Tensor) -> int:
    """Linear weights are (out, in), applied on the last axis; convolutions on axis 1."""
    return -1 if weight.dim() == 2 else 1


class Scheme(ABC):
    name: str

    def worker_op(self, op: LayerOp) -> LayerOp:
        """The operation the worker runs for a layer whose plain operation is `op`.

        Same values and FLOPs; a scheme may only ask for another memory layout of the result.
        """
        return op

    @abstractmethod
    def obfuscate(
        self, weight: torch.Tensor, bias: torch.Tensor | None, rng: SecretRandom
    ) -> tuple[torch.Tensor, LayerSecret]:
        """Offline: the weight to publish (same shape as `weight`) and the layer's secrets.

        Every random secret is drawn from `rng` (never a torch or numpy generator).
        """

    @abstractmethod
    def prepare_input(self, x: torch.Tensor, secret: LayerSecret) -> torch.Tensor:
        """Online, before the call: the input as the published weight expects it."""

    @abstractmethod
    def restore(
        self,
        y: torch.Tensor,
        secret: LayerSecret,
        mask_u: torch.Tensor | None = None,
        *,
        features_first: bool = False,
    ) -> torch.Tensor:
        """Online, after the call: the layer's true output, `y - mask_u` de-mixed plus bias.

        `features_first` allows a linear result in features-first memory (a transposed view of
        the same shape), for outputs that only elementwise ops and offloaded layers consume.
        """


def _add_bias(y: torch.Tensor, bias: torch.Tensor | None, channel_dim: int) -> torch.Tensor:
    if bias is None:
        return y
    shape = [1] * y.dim()
    shape[channel_dim] = -1
    return y.add_(bias.view(shape))


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


SCHEMES: dict[str, type[Scheme]] = {
    IdentityScheme.name: IdentityScheme,
    GroupCoverScheme.name: GroupCoverScheme,
}


def make_scheme(name: str, k: int = 4) -> Scheme:
    """A scheme by its registered name; `k` goes to schemes that group rows."""
    cls = SCHEMES.get(name)
    if cls is None:
        raise UsageError(f"unknown scheme {name!r}", hint=f"choose one of {', '.join(SCHEMES)}")
    if cls is GroupCoverScheme or getattr(cls, "takes_k", False):
        return cls(k=k)  # type: ignore[call-arg]
    return cls()


# Baseline and hardened schemes (groupcover/schemes/, issue 9) join the one public registry.
from groupcover.schemes.catalog import EXTRA_SCHEMES  # noqa: E402

SCHEMES.update(EXTRA_SCHEMES)
