"""The master's role: replace each offloadable layer by a proxy that calls the worker.

`protect` copies the model, obfuscates every `nn.Linear`, `nn.Conv1d` and `nn.Conv2d` with the
named scheme, publishes each published weight exactly once and swaps the layer for an
`OffloadedLayer`. Per forward a proxy permutes (and optionally masks) its input, calls the worker,
then unmasks, de-mixes and adds the bias; everything else in the model (attention products,
softmax, LayerNorm, activations, residuals, embeddings, BatchNorm) runs in the master unchanged.
The protected copy holds no plaintext weight of an offloaded layer.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from groupcover.audit import Audit
from groupcover.errors import UsageError
from groupcover.masks import MaskPair, MaskPolicy, MaskPool
from groupcover.scheme import LayerSecret, Scheme, make_scheme, op_for
from groupcover.transport import LayerOp, Transport
from groupcover.worker import apply_op

DEFAULT_MASK_POOL = 2  # pairs per layer and input shape filled ahead of time


class NothingToOffload(UsageError):
    """The model has no Linear/Conv1d/Conv2d layer that the worker could compute."""


class OffloadedLayer(nn.Module):
    """Stands in for one layer: the master's half of the protocol around `transport.run`.

    Everything the master adds around the call is timed as de-obfuscation: the input
    permutation, taking a mask (a dry pool's synchronous refill included) and adding it, and the
    unmasking, de-mixing and bias after the call.
    """

    def __init__(
        self,
        layer_id: str,
        op: LayerOp,
        secret: LayerSecret,
        scheme: Scheme,
        transport: Transport,
        masks: MaskPool | None,
        audit: Audit | None,
    ) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.op = op
        self.secret = secret
        self.scheme = scheme
        self.transport = transport
        self.masks = masks
        self.audit = audit
        self.fill_pairs = 0  # > 0 while `ProtectedModel.fill_masks` runs: compute locally

    def extra_repr(self) -> str:
        return f"{self.layer_id!r}, {self.op.kind}, scheme={self.scheme.name}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fill_pairs:
            return self._fill_forward(x)
        timings = self.transport.timings
        with timings.deobf():
            prepared = self.scheme.prepare_input(x, self.secret)
            mask = self._take_mask(prepared)
            sent = prepared if mask is None else prepared + mask.r
        if self.audit is not None:
            self.audit.note_call(self.layer_id, x, prepared, mask)
        y = self.transport.run(self.layer_id, sent)
        with timings.deobf():
            return self.scheme.restore(y, self.secret, None if mask is None else mask.u)

    def _take_mask(self, prepared: torch.Tensor) -> MaskPair | None:
        if self.masks is None:
            return None
        return self.masks.take(self.layer_id, tuple(prepared.shape))

    def _fill_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Offline: fill this layer's mask pool for x's shape; the result is computed locally."""
        assert self.masks is not None
        prepared = self.scheme.prepare_input(x, self.secret)
        self.masks.fill(self.layer_id, tuple(prepared.shape), self.fill_pairs)
        y = apply_op(self.op, prepared, self.masks.published_weight(self.layer_id))
        return self.scheme.restore(y, self.secret)


class ProtectedModel(nn.Module):
    """The model as the master runs it: plaintext non-linear parts, offloaded proxies."""

    def __init__(
        self,
        module: nn.Module,
        layers: dict[str, OffloadedLayer],
        transport: Transport,
        scheme: Scheme,
        masks: MaskPool | None,
        audit: Audit | None,
    ) -> None:
        super().__init__()
        self.module = module
        self.layers = layers
        self.transport = transport
        self.scheme = scheme
        self.masks = masks
        self.audit = audit

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.module(*args)

    def fill_masks(self, *example_inputs: torch.Tensor, pairs: int = DEFAULT_MASK_POOL) -> None:
        """Offline: `pairs` mask pairs per layer for the layer input shapes of these inputs.

        Runs one forward in the master with the published weights it keeps for masking; nothing
        is sent to the worker.
        """
        if self.masks is None or pairs <= 0:
            return
        for layer in self.layers.values():
            layer.fill_pairs = pairs
        try:
            with torch.no_grad():
                self.module(*example_inputs)
        finally:
            for layer in self.layers.values():
                layer.fill_pairs = 0

    def stats(self) -> dict[str, object]:
        return {
            "scheme": self.scheme.name,
            "offloaded_layers": len(self.layers),
            "masks": None if self.masks is None else self.masks.stats(),
        }


OffloadableModule = nn.Linear | nn.Conv1d | nn.Conv2d


def offloadable_layers(model: nn.Module) -> list[tuple[str, OffloadableModule, LayerOp]]:
    """(name, module, op) to offload; a module shared by several parents is listed under each."""
    found = []
    for name, module in model.named_modules(remove_duplicate=False):
        op = op_for(module)
        if op is not None and isinstance(module, OffloadableModule):
            found.append((name, module, op))
    return found


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def protect(
    model: nn.Module,
    transport: Transport,
    *,
    scheme: str | Scheme,
    masked: bool,
    seed: int,
    k: int = 4,
    mask_pool: int = DEFAULT_MASK_POOL,
    audit: bool = False,
    example_inputs: Sequence[torch.Tensor] | None = None,
    mask_policy: MaskPolicy | str = MaskPolicy.REFILL,
    mode: str = "",
) -> ProtectedModel:
    """A protected copy of `model` whose offloadable layers run on the worker behind `transport`.

    `scheme` is a name from `groupcover.scheme.SCHEMES` or a `Scheme`. With `masked`, each call
    uses a fresh one-time mask; `example_inputs` (the model's forward arguments) lets the pool be
    filled ahead of time with `mask_pool` pairs per layer, otherwise every pair is drawn online.
    With `audit`, an `Audit` watches every payload (`ProtectedModel.audit.report()`).
    """
    chosen = make_scheme(scheme, k) if isinstance(scheme, str) else scheme
    module = copy.deepcopy(model).eval()
    targets = offloadable_layers(module)
    if not targets:
        raise NothingToOffload(
            f"{type(model).__name__} has no layer to offload",
            hint="GroupCover offloads nn.Linear, nn.Conv1d and nn.Conv2d (groups=1) layers",
        )
    generator = torch.Generator().manual_seed(seed)
    masks = None
    if masked:
        mask_seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        masks = MaskPool(torch.Generator().manual_seed(mask_seed), policy=mask_policy)
    auditor = Audit(mode=mode or chosen.name) if audit else None
    if auditor is not None:
        transport.add_observer(auditor.observe)
    layers: dict[str, OffloadedLayer] = {}
    proxies: dict[int, OffloadedLayer] = {}  # a shared module is published once, under one name
    with torch.no_grad():
        for name, layer, op in targets:
            proxy = proxies.get(id(layer))
            if proxy is None:
                weight = layer.weight.detach()
                bias = None if layer.bias is None else layer.bias.detach()
                published, secret = chosen.obfuscate(weight, bias, generator)
                if auditor is not None:
                    auditor.register_layer(name, weight, bias, secret)
                transport.publish(name, published, op)
                if masks is not None:
                    masks.register(name, published, op)
                proxy = OffloadedLayer(name, op, secret, chosen, transport, masks, auditor)
                proxies[id(layer)] = proxy
                layers[name] = proxy
            _replace(module, name, proxy)
    protected = ProtectedModel(module, layers, transport, chosen, masks, auditor)
    if example_inputs is not None:
        protected.fill_masks(*example_inputs, pairs=mask_pool)
    return protected
