"""The master's role: replace each offloadable layer by a proxy that calls the worker.

`protect` copies the model, obfuscates every `nn.Linear`, `nn.Conv1d` and `nn.Conv2d` with the
named scheme, publishes each published weight exactly once and swaps the layer for an
`OffloadedLayer`. Per forward a proxy permutes (and optionally masks) its input, calls the worker,
then unmasks, de-mixes and adds the bias; everything else in the model (attention products,
softmax, LayerNorm, activations, residuals, embeddings, BatchNorm) runs in the master unchanged.
The protected copy holds no plaintext weight of an offloaded layer.

Memory layout: the first forward (or the offline mask filling) runs under a `LayoutProbe`, which
finds the layers whose outputs only reach other offloaded layers through elementwise
activations; those keep the features-first result of the de-mixing (no transposed copy), every
other output is made row-major. Values are the same either way.
"""

from __future__ import annotations

import contextlib
import copy
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from groupcover.audit import Audit
from groupcover.errors import UsageError
from groupcover.integrity import LayerCheck, checked_label
from groupcover.layer_op import apply_op, unquantized, with_quantum
from groupcover.masks import MASK_DTYPE, MaskPolicy, MaskPool
from groupcover.modular import quantum_exponent
from groupcover.rng import SecretRandom
from groupcover.schemes import LayerSecret, Scheme, make_scheme, op_for
from groupcover.transport import LayerOp, PublishedRef, Transport

DEFAULT_MASK_POOL = 2  # pairs per layer and input shape filled ahead of time


class NothingToOffload(UsageError):
    """The model has no Linear/Conv1d/Conv2d layer that the worker could compute."""


def worker_label(transport: Transport) -> str:
    """How errors name the worker behind a transport (its own name when it has one)."""
    for attribute in ("worker_name", "peer", "name"):
        value = getattr(transport, attribute, None)
        if isinstance(value, str) and value:
            return value
    worker = getattr(transport, "worker", None)
    if isinstance(worker, int):
        return f"worker{worker}"
    if isinstance(worker, str) and worker:
        return worker
    return f"the worker behind {type(transport).__name__}"


# Ops that read a tensor elementwise and keep its memory layout in their result.
_LAYOUT_KEEPING = frozenset(
    {"gelu", "relu", "relu_", "silu", "tanh", "sigmoid", "leaky_relu", "elu", "hardswish",
     "mish", "dropout"}
)  # fmt: skip


class LayoutProbe(TorchFunctionMode):
    """Watches one forward: which offloaded layers' outputs reach only other offloaded layers,
    through elementwise activations (FFN1 -> GELU -> FFN2 in a transformer).

    Those layers may return features-first memory (no transpose in the de-mixing, and the next
    layer permutes whole rows). Any other use of an output (a view, a residual add, a norm, an
    attention product, the model's own result) needs it row-major.
    """

    def __init__(self) -> None:
        super().__init__()
        self.produced: set[str] = set()
        self.escaped: set[str] = set()
        self._sources: dict[int, frozenset[str]] = {}
        self._quiet = 0

    @contextlib.contextmanager
    def quiet(self) -> Iterator[None]:
        """An offloaded layer's own work: consuming a tagged input there is not an escape."""
        self._quiet += 1
        try:
            yield
        finally:
            self._quiet -= 1

    def tag(self, layer_id: str, output: torch.Tensor) -> None:
        self.produced.add(layer_id)
        self._mark(output, frozenset({layer_id}))

    def _mark(self, tensor: torch.Tensor, sources: frozenset[str]) -> None:
        """Tags a tensor by id; the tag goes when the tensor does (before its id can be reused),
        so the probe keeps no output alive (holding them all cost a BERT-base master 400 MB)."""
        key = id(tensor)
        if key not in self._sources:
            weakref.finalize(tensor, self._sources.pop, key, None)
        self._sources[key] = sources

    def _sources_of(self, tree: object) -> frozenset[str]:
        found: frozenset[str] = frozenset()
        for leaf in pytree.tree_leaves(tree):
            if isinstance(leaf, torch.Tensor):
                found |= self._sources.get(id(leaf), frozenset())
        return found

    def note_result(self, result: object) -> None:
        """What the model returns escapes."""
        self.escaped |= self._sources_of(result)

    def features_first_layers(self) -> set[str]:
        return self.produced - self.escaped

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Sequence[type],
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        result = func(*args, **(kwargs or {}))
        if self._quiet or not isinstance(result, torch.Tensor):
            return result  # metadata queries (shape, dim) and the layers' own work
        sources = self._sources_of((args, kwargs))
        if not sources:
            return result
        if getattr(func, "__name__", "") in _LAYOUT_KEEPING:
            self._mark(result, sources)
        else:
            self.escaped |= sources
        return result


class OffloadedLayer(nn.Module):
    """Stands in for one layer: the master's half of the protocol around `transport.run`.

    Everything the master adds around the call is timed as de-obfuscation: the input
    permutation, taking a mask (a dry pool's synchronous refill included) and adding it, the
    integrity check (with `check`; its own time is also in `check.seconds`), and the
    unmasking, de-mixing and bias after the call. In masked modes the payload and the worker's
    result are int32 residues mod 2^32 (`groupcover.masks`, `groupcover.modular`); the unmasked
    result goes back to the layer's dtype before the de-mixing.

    Behind a transport with a mask worker (`groupcover.twoworkers`, the `-2w` modes) the mask
    is drawn for the call and its product u comes from the mask worker, in parallel with the
    worker's call (`_forward_two_workers`); both results are checked.
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
        check: LayerCheck | None = None,
        dtype: torch.dtype = torch.float32,
        mask_audit: Audit | None = None,
    ) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.mask_transport: Transport | None = getattr(transport, "mask_transport", None)
        self.mask_audit = mask_audit  # watches what the mask worker receives
        self.check = check
        self.dtype = dtype
        self.worker = worker_label(transport)
        self.op = op
        self.secret = secret
        self.scheme = scheme
        self.transport = transport
        self.masks = masks
        self.audit = audit
        self.fill_pairs = 0  # > 0 while `ProtectedModel.fill_masks` runs: compute locally
        self.local = False  # compute locally without filling (the offline layout probe)
        self.features_first_out = False  # set by `LayoutProbe`: the output may stay features-first
        self.probe: LayoutProbe | None = None

    def extra_repr(self) -> str:
        return f"{self.layer_id!r}, {self.op.kind}, scheme={self.scheme.name}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.probe is None:
            return self._forward(x)
        with self.probe.quiet():
            y = self._forward(x)
        if self.op.params.get("transposed", 0):
            self.probe.tag(self.layer_id, y)
        return y

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fill_pairs or self.local:
            return self._fill_forward(x)
        if self.masks is not None:
            return self._forward_masked(x, self.masks)
        timings = self.transport.timings
        with timings.deobf():
            prepared = self.scheme.prepare_input(x, self.secret)
        if self.audit is not None:
            self.audit.note_call(self.layer_id, x, prepared, None)
        y = self.transport.run(self.layer_id, prepared)
        with timings.deobf():
            if self.check is not None:
                self.check.check(prepared, y, self.worker)
            return self.scheme.restore(y, self.secret, features_first=self.features_first_out)

    def _forward_masked(self, x: torch.Tensor, masks: MaskPool) -> torch.Tensor:
        """One masked call (`groupcover.masks`): the payload is P = X + rho mod 2^32, the
        worker's result comes back as residues; Z = Y - U (wrapping) is op(X, W'') in result
        quanta, checked, then scaled to the layer's output and restored. Behind a transport
        with a mask worker (the `-2w` modes), rho leaves first and U comes from the mask
        worker, in parallel with the worker's call: the master makes no product."""
        timings = self.transport.timings
        mask_transport = self.mask_transport
        pending = None
        with timings.deobf():
            prepared = self.scheme.prepare_input(x, self.secret)
            if mask_transport is None:
                pair = masks.take(self.layer_id, tuple(prepared.shape), prepared)
            else:
                pair = masks.draw_mask(self.layer_id, tuple(prepared.shape), prepared)
                if self.mask_audit is not None:
                    self.mask_audit.note_call(self.layer_id, x, prepared, pair)
                pending = mask_transport.run_async(self.layer_id, pair.r)
            _rho, u = pair.consume()
            blinded = masks.blind(self.layer_id, prepared, pair,
                                  None if self.check is None else self.check.v)  # fmt: skip
        if self.audit is not None:
            self.audit.note_call(self.layer_id, x, prepared, pair)
        y = self.transport.run(self.layer_id, blinded.payload)
        if pending is not None:
            waited = time.perf_counter()
            u = pending.result()  # usually there already: both workers computed at once
            timings.record_wait(time.perf_counter() - waited)
        with timings.deobf():
            check = self.check
            unblinded = masks.unblind(self.layer_id, y, u, blinded,
                                      None if check is None else check.s, self.dtype)  # fmt: skip
            if check is not None:
                check.check_quanta(blinded, unblinded, self.worker, self._mask_worker_label())
            return self.scheme.restore(unblinded.output, self.secret,
                                       features_first=self.features_first_out)  # fmt: skip

    def _mask_worker_label(self) -> str | None:
        if self.mask_transport is None:
            return None
        return worker_label(self.mask_transport)

    def _fill_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Offline: fill this layer's mask pool for x's shape; the result is computed locally."""
        assert self.masks is not None
        prepared = self.scheme.prepare_input(x, self.secret)
        if self.fill_pairs:  # with a mask worker: no pairs, the bound and layout only
            pairs = 0 if self.mask_transport is not None else self.fill_pairs
            self.masks.fill(self.layer_id, tuple(prepared.shape), pairs, like=prepared)
        weight = self.masks.published_weight(self.layer_id)
        y = apply_op(unquantized(self.op), prepared.to(weight.dtype), weight).to(prepared.dtype)
        return self.scheme.restore(y, self.secret, features_first=self.features_first_out)


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
        rng: SecretRandom | None = None,
    ) -> None:
        super().__init__()
        self.module = module
        self.layers = layers
        self.transport = transport
        self.scheme = scheme
        self.masks = masks
        self.audit = audit
        self.seed = None if rng is None else rng.seed
        self.secrets_notice = "" if rng is None else rng.notice
        self.verify = any(layer.check is not None for layer in layers.values())
        self.layouts_probed = False
        self.mask_worker = getattr(transport, "mask_transport", None) is not None
        self.mask_audit: Audit | None = None  # the mask worker's payloads (the -2w modes)
        self.audit_note = ""  # why a requested audit did not run (a package without baselines)

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            if self.layouts_probed:
                return self.module(*args)
            return self._probe_layouts(*args)

    def _probe_layouts(self, *args: torch.Tensor) -> torch.Tensor:
        """One forward under a `LayoutProbe`; later forwards keep the layouts it found."""
        probe = LayoutProbe()
        for layer in self.layers.values():
            layer.probe = probe
        try:
            with probe:
                result = self.module(*args)
            probe.note_result(result)
        finally:
            for layer in self.layers.values():
                layer.probe = None
        chosen = probe.features_first_layers()
        for name, layer in self.layers.items():
            layer.features_first_out = name in chosen
        self.layouts_probed = True
        return result

    def features_first_layers(self) -> list[str]:
        """The layers whose outputs stay features-first (after the first forward)."""
        return [name for name, layer in self.layers.items() if layer.features_first_out]

    def fill_masks(self, *example_inputs: torch.Tensor, pairs: int = DEFAULT_MASK_POOL) -> None:
        """Offline: `pairs` mask pairs per layer for the layer input shapes of these inputs.

        Runs one forward in the master with the published weights it keeps for masking; nothing
        is sent to the worker.
        """
        if self.masks is None or pairs <= 0:
            return
        if not self.layouts_probed:  # masks take the layout their inputs will have
            for layer in self.layers.values():
                layer.local = True
            try:
                with torch.no_grad():
                    self._probe_layouts(*example_inputs)
            finally:
                for layer in self.layers.values():
                    layer.local = False
        for layer in self.layers.values():
            layer.fill_pairs = pairs
        try:
            with torch.no_grad():
                self.module(*example_inputs)
        finally:
            for layer in self.layers.values():
                layer.fill_pairs = 0

    def top_up_masks(self, pairs: int = 1) -> bool:
        """Offline, between forwards: every layer's pools for the input shapes already seen back
        to `pairs` pairs ahead (within the pool's budget), without a local forward. False when
        nothing was seen yet (then `fill_masks` with example inputs is the way). With a mask
        worker there is nothing to draw ahead: True, having done nothing."""
        if self.mask_worker:
            return True
        if self.masks is None or not self.layouts_probed or not self.masks.known_shapes():
            return False
        self.masks.top_up(pairs)
        return True

    def stats(self) -> dict[str, object]:
        return {
            "scheme": self.scheme.name,
            "offloaded_layers": len(self.layers),
            "masks": None if self.masks is None else self.masks.stats(),
            "secrets": self.secrets_notice,
            "seed": self.seed,
            "integrity": self.integrity_stats(),
        }

    def integrity_stats(self) -> dict[str, object] | None:
        """Calls checked and the checks' seconds, over every layer (None without `verify`)."""
        checks = [layer.check for layer in self.layers.values() if layer.check is not None]
        if not checks:
            return None
        stats: dict[str, object] = {
            "checked": sum(check.checked for check in checks),
            "seconds": sum(check.seconds for check in checks),
            "worst_ratio": max(check.worst for check in checks),
            "slack": checks[0].slack,
            # the largest tolerance relative to its result's largest value (passing calls), and
            # the secret vectors' grid (eps of their dtype): see `integrity.checked_label`
            "loosest_tolerance": max(check.loosest for check in checks),
            "grid": max(torch.finfo(check.s.dtype).eps for check in checks),
            "residues": any(check.quantum is not None for check in checks),
        }
        stats["label"] = checked_label(stats)
        return stats


OffloadableModule = nn.Linear | nn.Conv1d | nn.Conv2d


def mask_worker_audit(transport: Transport, auditor: Audit | None) -> Audit | None:
    """A second audit on the mask worker's session, where there is one and an audit runs: what
    the mask worker receives is checked like the worker's (`Audit.mask_worker`)."""
    mask_transport = getattr(transport, "mask_transport", None)
    if auditor is None or mask_transport is None:
        return None
    watcher = auditor.for_mask_worker()
    mask_transport.add_observer(watcher.observe)
    return watcher


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
    seed: int | None = None,
    k: int = 4,
    mask_pool: int = DEFAULT_MASK_POOL,
    audit: bool = False,
    example_inputs: Sequence[torch.Tensor] | None = None,
    mask_policy: MaskPolicy | str = MaskPolicy.REFILL,
    mode: str = "",
    verify: bool = True,
) -> ProtectedModel:
    """A protected copy of `model` whose offloadable layers run on the worker behind `transport`.

    `scheme` is a name from `groupcover.schemes.SCHEMES` or a `Scheme`. With `masked`, each call
    uses a fresh one-time mask; `example_inputs` (the model's forward arguments) lets the pool be
    filled ahead of time with `mask_pool` pairs per layer, otherwise every pair is drawn online.
    With `audit`, an `Audit` watches every payload (`ProtectedModel.audit.report()`).

    Every secret (permutations, mixing, masks, integrity vectors) comes from one `SecretRandom`:
    the OS CSPRNG when `seed` is None, else reproducible from the seed, and then not secret
    (`ProtectedModel.secrets_notice` says so). Masked modes publish the weight in float64 and
    send float64 payloads (see `groupcover.masks`). Every result of the worker is checked
    (`groupcover.integrity`; `verify=False` turns it off) and a wrong one raises `IntegrityError`.
    """
    chosen = make_scheme(scheme, k) if isinstance(scheme, str) else scheme
    module = copy.deepcopy(model).eval()
    targets = offloadable_layers(module)
    if not targets:
        raise NothingToOffload(
            f"{type(model).__name__} has no layer to offload",
            hint="GroupCover offloads nn.Linear, nn.Conv1d and nn.Conv2d (groups=1) layers",
        )
    rng = SecretRandom.create(seed)
    obfuscation_rng, check_rng = rng.spawn("obfuscation"), rng.spawn("integrity")
    masks = None
    if masked:
        masks = MaskPool(rng.spawn("masks"), policy=mask_policy)
    auditor = Audit(mode=mode or chosen.name) if audit else None
    if auditor is not None:
        transport.add_observer(auditor.observe)
    mask_auditor = mask_worker_audit(transport, auditor)
    layers: dict[str, OffloadedLayer] = {}
    proxies: dict[int, OffloadedLayer] = {}  # a shared module is published once, under one name
    with torch.no_grad():
        for name, layer, op in targets:
            proxy = proxies.get(id(layer))
            if proxy is None:
                op = chosen.worker_op(op)
                weight = layer.weight.detach()
                bias = None if layer.bias is None else layer.bias.detach()
                published, secret = chosen.obfuscate(weight, bias, obfuscation_rng.spawn(name))
                if masks is not None:
                    published = published.to(MASK_DTYPE)  # exactly the same values, in float64
                    op = with_quantum(op, quantum_exponent(published, op))
                for watcher in (auditor, mask_auditor):
                    if watcher is not None:
                        watcher.register_layer(name, weight, bias, secret)
                transport.publish(name, published, op)
                if masks is not None:
                    masks.register(name, published, op)
                check = None
                if verify:
                    check = LayerCheck.create(name, published, op, check_rng.spawn(name))
                proxy = OffloadedLayer(name, op, secret, chosen, transport, masks, auditor,
                                       check, weight.dtype, mask_auditor)  # fmt: skip
                proxies[id(layer)] = proxy
                layers[name] = proxy
            _replace(module, name, proxy)
    protected = ProtectedModel(module, layers, transport, chosen, masks, auditor, rng)
    protected.mask_audit = mask_auditor
    if example_inputs is not None:
        protected.fill_masks(*example_inputs, pairs=mask_pool)
    return protected


@dataclass(frozen=True)
class PackagedLayer:
    """One offloaded layer of a model package, as `assemble` wires it: its secrets come from the
    sealed bundle, its published weight is read when needed (`load`, float32 as published) and
    reaches the worker by reference when `ref` is set."""

    name: str
    aliases: tuple[str, ...]
    op: LayerOp  # what the worker runs (the scheme's worker op)
    secret: LayerSecret
    weight_shape: tuple[int, ...]
    load: Callable[[], torch.Tensor]
    ref: PublishedRef | None = None
    dtype: torch.dtype = torch.float32  # the layer's own dtype


def assemble(
    module: nn.Module,
    layers: Sequence[PackagedLayer],
    transport: Transport,
    *,
    scheme: Scheme,
    masked: bool,
    seed: int | None = None,
    mask_pool: int = DEFAULT_MASK_POOL,
    mask_budget: int | None = None,
    audit_weights: dict[str, tuple[torch.Tensor, torch.Tensor | None]] | None = None,
    audit_verdicts: dict[str, dict[str, Any]] | None = None,
    example_inputs: Sequence[torch.Tensor] | None = None,
    mask_policy: MaskPolicy | str = MaskPolicy.REFILL,
    mode: str = "",
    verify: bool = True,
) -> ProtectedModel:
    """A protected model from a package's parts, without obfuscating anything.

    `module` is the model with its non-offloaded parameters loaded; each layer's proxy replaces
    its name and aliases there. Published weights are never all held: `load` reads one when the
    transport, the mask pool or the integrity check needs it. `audit_weights` (plaintext weights,
    from a package's sealed baselines only) lets the payload audit run; `audit_verdicts` are the
    publish checks the package's protect made (`Audit.accept_verdicts`).
    """
    rng = SecretRandom.create(seed)
    check_rng = rng.spawn("integrity")
    masks = None
    if masked:
        masks = MaskPool(rng.spawn("masks"), policy=mask_policy, budget_bytes=mask_budget)
    auditor = None
    if audit_weights is not None:
        auditor = Audit(mode=mode or scheme.name)
        auditor.accept_verdicts(audit_verdicts or {})
        transport.add_observer(auditor.observe)
    mask_auditor = mask_worker_audit(transport, auditor)
    compute = MASK_DTYPE if masked else None
    proxies: dict[str, OffloadedLayer] = {}
    with torch.no_grad():
        for layer in layers:

            def load(layer: PackagedLayer = layer) -> torch.Tensor:
                weight = layer.load()
                return weight if compute is None else weight.to(compute)

            # one read (and digest check) of the published weight for the quantum, a publish by
            # tensor and the check
            published = load() if masked or verify else None
            if masked:  # residues in and out, in a quantum fixed by the published weight
                assert published is not None
                layer = replace(
                    layer, op=with_quantum(layer.op, quantum_exponent(published, layer.op))
                )
            if auditor is not None:
                weight, bias = audit_weights[layer.name]  # type: ignore[index]
                auditor.register_layer(layer.name, weight, bias, layer.secret)
                if mask_auditor is not None:
                    mask_auditor.register_layer(layer.name, weight, bias, layer.secret)
            publish_ref = getattr(transport, "publish_ref", None)
            if layer.ref is not None and publish_ref is not None:
                publish_ref(layer.name, layer.ref, layer.op, load, compute or layer.dtype)
            else:
                transport.publish(layer.name, load() if published is None else published, layer.op)
            if masks is not None:
                masks.register(layer.name, None, layer.op, loader=layer.load,
                               weight_shape=layer.weight_shape)  # fmt: skip
            check = None
            if published is not None and verify:
                check = LayerCheck.create(layer.name, published, layer.op,
                                          check_rng.spawn(layer.name))  # fmt: skip
            del published  # hold no copy of every layer
            proxy = OffloadedLayer(layer.name, layer.op, layer.secret, scheme, transport, masks,
                                   auditor, check, layer.dtype, mask_auditor)  # fmt: skip
            proxies[layer.name] = proxy
            for name in (layer.name, *layer.aliases):
                _replace(module, name, proxy)
    protected = ProtectedModel(module.eval(), proxies, transport, scheme, masks, auditor, rng)
    protected.mask_audit = mask_auditor
    if example_inputs is not None and masks is not None:
        protected.fill_masks(*example_inputs, pairs=mask_pool)
    return protected
