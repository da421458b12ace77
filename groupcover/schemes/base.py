"""The pluggable obfuscation scheme: one layer in, published weight plus master-side secrets out.

A scheme obfuscates one layer offline (`obfuscate`), transforms each input before it leaves the
master (`prepare_input`) and turns the worker's result back into the layer's true output
(`restore`). The benchmark's modes differ only by the scheme they name.

Registration: a subclass that sets `name` in its class body joins `SCHEMES` when its class
statement runs (`Scheme.__init_subclass__`); `groupcover.schemes` imports every module that
defines one, so importing that package fills the registry. A new scheme is one more subclass.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from groupcover.layer_op import LayerOp, OpKind
from groupcover.rng import SecretRandom


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


SCHEMES: dict[str, type[Scheme]] = {}
"""Every scheme by name, in the order their classes were defined (filled by `Scheme`)."""


class Scheme(ABC):
    name: ClassVar[str]
    takes_k: ClassVar[bool] = False  # whether the constructor takes the group size `k`

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Registers a subclass that names itself (`name = "..."` in its own body) in `SCHEMES`;
        an intermediate base without a name of its own stays out."""
        super().__init_subclass__(**kwargs)
        name = cls.__dict__.get("name")
        if name is None:
            return
        if name in SCHEMES:
            raise TypeError(f"two schemes named {name!r}: {SCHEMES[name]!r} and {cls!r}")
        SCHEMES[name] = cls

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
