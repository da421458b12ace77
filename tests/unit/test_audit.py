"""The payload audit against deliberately broken schemes, transports and mask pools.

Every leak below was missed by the audit the project had before this one (its checks compared a
payload only with its own layer's plaintext, only up to exact equality or row cosine, and skipped
the inputs of unmasked modes). Each test builds the leak for real through `protect` and the
in-process transport, runs forwards, and asserts that the audit names it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from groupcover.audit import Audit, noise_floor
from groupcover.inprocess import InProcessTransport
from groupcover.layer_op import apply_op
from groupcover.masks import MaskPair
from groupcover.master import ProtectedModel, protect
from groupcover.models import load_model
from groupcover.modes import MODES, build_for_mode
from groupcover.modular import edges
from groupcover.schemes import GroupCoverScheme, IdentityScheme
from groupcover.transport import LayerOp
from tests.unit.conftest import SMALL_BERT


def small_bert() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    model, example = load_model("bert-base", 0, **SMALL_BERT)
    return model, example(2, 8)


def run_protected(
    scheme: Any = "groupcover",
    *,
    masked: bool = True,
    transport: InProcessTransport | None = None,
    pool: Callable[[Any], Any] | None = None,
    forwards: int = 2,
    model: nn.Module | None = None,
    inputs: tuple[torch.Tensor, ...] | None = None,
) -> dict:
    if model is None:
        model, inputs = small_bert()
    assert inputs is not None
    protected = protect(
        model, transport or InProcessTransport(), scheme=scheme, masked=masked, seed=3, audit=True
    )
    if pool is not None:
        wrap_pool(protected, pool)
    for _ in range(forwards):
        protected(*inputs)
    assert protected.audit is not None
    return protected.audit.report()


def wrap_pool(protected: ProtectedModel, make: Callable[[Any], Any]) -> None:
    wrapped = make(protected.masks)
    wrapped.ops = {name: layer.op for name, layer in protected.layers.items()}
    protected.masks = wrapped
    for layer in protected.layers.values():
        layer.masks = wrapped


class ScaledPool:
    """A mask pool whose masks are the real ones times `factor`, rounded to int32 (0: zero
    masks); u is computed for the new mask as the pool computes its own (round(op(r, W'') / q)
    mod 2^32, the layer's quantized op), so the calls still unmask exactly."""

    ops: dict[str, LayerOp]

    def __init__(self, inner: Any, factor: float) -> None:
        self.inner, self.factor = inner, factor

    def take(self, layer_id: str, shape: tuple[int, ...], *args: Any) -> MaskPair:
        pair = self.inner.take(layer_id, shape, *args)
        return self.pair(layer_id, scaled(pair.r, self.factor))

    def pair(self, layer_id: str, r: torch.Tensor) -> MaskPair:
        with torch.no_grad():
            u = apply_op(self.ops[layer_id], r, self.inner.published_weight(layer_id))
        return MaskPair(r, u, edges(r))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def scaled(r: torch.Tensor, factor: float) -> torch.Tensor:
    """round(r x factor) as int32, in r's memory layout (|factor| <= 1: no overflow)."""
    return r.to(torch.float64).mul_(factor).round_().to(torch.int32)


class WeakPool(ScaledPool):
    """Broken: masks of the input's own scale (X + r, |r| <= 1e-3 in the input's units, i.e.
    1e-3 x 2^22 / B in fixed point), as float noise is."""

    def take(self, layer_id: str, shape: tuple[int, ...], *args: Any) -> MaskPair:
        pair = self.inner.take(layer_id, shape, *args)
        factor = 1e-3 * self.inner.input_scale(layer_id) / float(pair.r.double().abs().max())
        return self.pair(layer_id, scaled(pair.r, factor))


class ReusingPool(ScaledPool):
    """Broken: hands out the first mask of each layer again on every call (as a new pair object,
    which is how a pool that reuses its tensors gets past `MaskPair.consume`)."""

    def __init__(self, inner: Any) -> None:
        super().__init__(inner, 1.0)
        self.first: dict[str, MaskPair] = {}

    def take(self, layer_id: str, shape: tuple[int, ...], *args: Any) -> MaskPair:
        if layer_id not in self.first:
            self.first[layer_id] = super().take(layer_id, shape, *args)
        first = self.first[layer_id]
        return MaskPair(first.r, first.u, first.edges)


class LeakyTransport(InProcessTransport):
    """Broken: sends extra payloads beside the protocol's own, through the same observers."""

    def __init__(self, extra: Callable[[str, str, torch.Tensor], list[tuple[str, str, Any]]]):
        super().__init__()
        self.extra = extra

    def publish(self, layer_id: str, weight: torch.Tensor, op: LayerOp) -> None:
        super().publish(layer_id, weight, op)
        for event, target, tensor in self.extra("publish", layer_id, weight):
            self._emit(event, target, tensor)

    def run_async(self, layer_id: str, x: torch.Tensor):  # type: ignore[no-untyped-def]
        future = super().run_async(layer_id, x)
        for event, target, tensor in self.extra("run", layer_id, x):
            self._emit(event, target, tensor)
        return future


def plaintext_of(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def secrets_of(holder: dict[str, Any], layer_id: str) -> Any:
    return holder["protected"].layers[layer_id].secret


def leaks_with(report: dict, fragment: str) -> list[str]:
    return [leak for leak in report["leaks"] if fragment in leak]


# ---- the clean protocol ---------------------------------------------------------------------


def test_reports_per_mode() -> None:
    layers = 4 * SMALL_BERT["layers"]
    for mode in MODES:
        model, inputs = small_bert()
        built = build_for_mode(model, mode, InProcessTransport(), seed=4, audit=True)
        built(*inputs)
        built(*inputs)
        assert built.audit is not None
        report = built.audit.report()
        assert report["mode"] == mode
        if mode == "tee-only":
            assert report["payloads"] == 0 and report["leaks"] == []
            continue
        assert report["payloads"] == layers + 2 * layers  # publish once, then two forwards
        assert report["bytes"] > 0
        if mode == "groupcover":
            assert report["leaks"] == [], report["leaks"]
            assert report["input_exposed"] is False
        if mode in ("plain-offload", "mask-only"):  # plaintext weights are published by design
            assert leaks_with(report, "equals the plaintext weight")
        if mode in ("plain-offload", "groupcover-nomask"):
            assert report["input_exposed"] is True
        if mode == "mask-only":
            assert report["input_exposed"] is False
            assert not leaks_with(report, "mask")


def test_unmasked_modes_expose_the_input() -> None:
    plain = run_protected("identity", masked=False)
    assert leaks_with(plain, "input exposed: run payload is the plaintext input")
    permuted = run_protected("groupcover", masked=False)
    assert leaks_with(permuted, "input exposed: run payload is the input with its features")
    assert permuted["input_exposed"] is True


# ---- broken schemes -------------------------------------------------------------------------


class PermutedNotMixed(GroupCoverScheme):
    """Broken: publishes the weight with its input columns permuted, rows not mixed."""

    def obfuscate(self, weight, bias, generator):  # type: ignore[no-untyped-def]
        _, secret = super().obfuscate(weight, bias, generator)
        return weight[:, secret.in_perm].contiguous(), secret


class RowsShuffled(GroupCoverScheme):
    """Broken: publishes the plaintext weight with its rows shuffled."""

    def obfuscate(self, weight, bias, generator):  # type: ignore[no-untyped-def]
        _, secret = super().obfuscate(weight, bias, generator)
        order = torch.arange(weight.shape[0]).flip(0)
        return weight[order].contiguous(), secret


def test_columns_permuted_but_not_mixed_is_flagged() -> None:
    report = run_protected(PermutedNotMixed(4), forwards=0)
    rows = leaks_with(report, "publish payload rows reproduce")
    assert len(rows) == 4 * SMALL_BERT["layers"]
    assert all("(up to scale and order)" in leak for leak in rows)
    assert len(leaks_with(report, "publish payload columns reproduce")) >= len(rows)


def test_rows_shuffled_is_flagged() -> None:
    report = run_protected(RowsShuffled(4), forwards=0)
    assert len(leaks_with(report, "matches a plaintext weight row")) == 4 * SMALL_BERT["layers"]


def test_groups_of_one_scale_single_rows_and_are_flagged() -> None:
    report = run_protected(GroupCoverScheme(1), forwards=0)
    assert len(leaks_with(report, "up to scale and order")) >= 4 * SMALL_BERT["layers"]


def test_a_one_output_layer_is_flagged() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 1)).eval()
    report = run_protected("groupcover", model=model, inputs=(torch.randn(4, 32),), forwards=0)
    assert leaks_with(report, "2: publish payload rows reproduce 2: plaintext weight rows")


# ---- broken transports ----------------------------------------------------------------------


def leaky(make: Callable[[dict, str, str, torch.Tensor], list]) -> tuple[InProcessTransport, dict]:
    model, inputs = small_bert()
    holder: dict[str, Any] = {"model": model, "inputs": inputs, "plain": plaintext_of(model)}
    transport = LeakyTransport(lambda event, layer_id, t: make(holder, event, layer_id, t))
    return transport, holder


def run_leaky(make: Callable[[dict, str, str, torch.Tensor], list]) -> dict:
    transport, holder = leaky(make)
    protected = protect(
        holder["model"], transport, scheme="groupcover", masked=True, seed=3, audit=True
    )
    holder["protected"] = protected
    protected(*holder["inputs"])
    assert protected.audit is not None
    return protected.audit.report()


FIRST = "layer.0.attention.qkv"
OTHER = "layer.1.ffn2"


def test_a_plaintext_weight_as_a_call_payload_is_flagged() -> None:
    def extra(h: dict, event: str, layer_id: str, t: torch.Tensor) -> list:
        if event == "run" and layer_id == FIRST:
            return [("run", FIRST, h["plain"][OTHER].weight.detach().clone())]
        return []

    report = run_leaky(extra)
    assert leaks_with(report, f"{FIRST}: run payload rows reproduce {OTHER}: plaintext weight")


def test_a_plaintext_weight_under_another_layer_id_is_flagged() -> None:
    def extra(h: dict, event: str, layer_id: str, t: torch.Tensor) -> list:
        if event == "publish" and layer_id == FIRST:
            weight = h["plain"][FIRST].weight.detach().clone()
            return [("publish", "decoy", weight), ("publish", OTHER, weight)]
        return []

    report = run_leaky(extra)
    assert leaks_with(report, f"decoy: publish payload rows reproduce {FIRST}: plaintext")
    assert leaks_with(report, f"{OTHER}: publish payload rows reproduce {FIRST}: plaintext")


def test_a_transposed_weight_is_flagged() -> None:
    def extra(h: dict, event: str, layer_id: str, t: torch.Tensor) -> list:
        if event == "publish" and layer_id == OTHER:
            return [("publish", OTHER, h["plain"][OTHER].weight.detach().t().contiguous())]
        return []

    report = run_leaky(extra)
    assert leaks_with(report, f"{OTHER}: publish payload columns reproduce {OTHER}: plaintext")


def test_scaled_or_shifted_bias_is_flagged() -> None:
    def extra(h: dict, event: str, layer_id: str, t: torch.Tensor) -> list:
        if event == "run" and layer_id == FIRST:
            bias = h["plain"][OTHER].bias.detach()
            return [("run", FIRST, 2.5 * bias - 0.3)]
        return []

    report = run_leaky(extra)
    assert leaks_with(report, f"{FIRST}: run payload contains the bias of layer {OTHER}")


def test_inverse_permutation_and_restore_tables_are_flagged() -> None:
    def extra(h: dict, event: str, layer_id: str, t: torch.Tensor) -> list:
        if event == "run" and layer_id == OTHER:
            secret = secrets_of(h, OTHER)
            inverse = torch.argsort(secret.in_perm).to(torch.float32)
            return [
                ("run", OTHER, inverse),
                ("run", OTHER, secret.restore_coef.clone()),
                ("run", OTHER, secret.restore_index.to(torch.float32)),
            ]
        return []

    report = run_leaky(extra)
    assert leaks_with(report, f"{OTHER}: run payload contains the inverse input permutation")
    assert leaks_with(report, "contains the restore coefficients")
    assert leaks_with(report, "contains the restore index")


def test_secrets_in_payloads_are_flagged() -> None:
    def extra(h: dict, event: str, layer_id: str, t: torch.Tensor) -> list:
        if event == "run" and layer_id == OTHER:
            secret = secrets_of(h, OTHER)
            mixing = torch.linalg.inv(secret.inverse.double())
            return [
                ("run", OTHER, secret.in_perm.to(torch.float32)),
                ("publish", OTHER, secret.inverse.clone()),
                ("run", "x", mixing[0].float()),
            ]
        return []

    report = run_leaky(extra)
    assert leaks_with(report, f"{OTHER}: run payload contains the input permutation")
    assert leaks_with(report, "contains rows of the inverse mixing")
    assert leaks_with(report, f"x: run payload contains rows of the mixing of layer {OTHER}")


# ---- broken masks ---------------------------------------------------------------------------


def test_weak_masks_are_flagged() -> None:
    report = run_protected(pool=lambda inner: WeakPool(inner, 1.0))
    flagged = leaks_with(report, "mask too weak")
    assert len(flagged) == 4 * SMALL_BERT["layers"]


def test_zero_masks_are_flagged() -> None:
    report = run_protected(pool=lambda inner: ScaledPool(inner, 0.0))
    assert (
        len(leaks_with(report, "run payload equals the unmasked input")) == 4 * SMALL_BERT["layers"]
    )


def test_a_mask_used_twice_is_flagged() -> None:
    report = run_protected(pool=lambda inner: ReusingPool(inner), forwards=2)
    assert len(leaks_with(report, "a mask was used twice")) == 4 * SMALL_BERT["layers"]


# ---- leakage figure -------------------------------------------------------------------------


def test_leakage_figure_sits_at_the_noise_floor_only_for_hiding_masks() -> None:
    hiding = run_protected(pool=lambda inner: ScaledPool(inner, 1.0), forwards=4)
    weak = run_protected(pool=lambda inner: WeakPool(inner, 1.0), forwards=4)
    for report, hides in ((hiding, True), (weak, False)):
        assert report["leakage"]
        for row in report["leakage"]:
            assert row["noise_floor"] > 0
            assert 0 <= row["p_value"] <= 1 and row["alpha"] == 0.01
            assert row["noise_floor"] < row["null_quantile"] < row["detectable_corr"]
            if hides:
                assert row["max_abs_correlation"] < 3 * row["noise_floor"]
                assert row["distinguisher_advantage"] < 0.2  # few trials at this size
            else:
                # > 0.98: each call is put on its own scale before pooling
                assert row["max_abs_correlation"] > 0.98 and row["above_null"]
                assert row["distinguisher_advantage"] > 0.9
        assert report["correlation_above_null"] is not hides


def test_noise_floor_matches_the_known_figures() -> None:
    assert 0.02 < noise_floor(10_000, 384) < 0.045
    assert 0.006 < noise_floor(100_000, 384) < 0.014


def test_disabled_audit_sees_nothing() -> None:
    audit = Audit(mode="t", enabled=False)
    audit.observe("publish", "fc", torch.randn(4, 4))
    assert audit.report()["payloads"] == 0


@pytest.mark.parametrize("scheme", [IdentityScheme(), GroupCoverScheme(4)])
def test_the_clean_protocol_with_hiding_masks_has_no_mask_leak(scheme: Any) -> None:
    report = run_protected(scheme, pool=lambda inner: ScaledPool(inner, 1.0))
    assert not leaks_with(report, "mask")
    assert not leaks_with(report, "unmasked")
    assert report["input_exposed"] is False


def test_audits_of_one_model_share_the_plaintext_index_and_free_it() -> None:
    """The benchmark audits several modes of one model in one process: the signature tables of
    a plaintext weight are built once (float32 unit rows) and go when the last audit goes."""
    import gc

    from groupcover import payload_match

    model, _ = small_bert()
    first = protect(model, InProcessTransport(), scheme="groupcover", masked=True, audit=True)
    second = protect(model, InProcessTransport(), scheme="hardened", masked=True, audit=True)
    assert first.audit is not None and second.audit is not None
    ours = [table for tables in first.audit._index._tables.values() for table in tables]
    theirs = [table for tables in second.audit._index._tables.values() for table in tables]
    assert ours and {id(t) for t in ours} == {id(t) for t in theirs}
    assert all(table.canon.dtype == torch.float32 for table in ours)
    # a leak of one layer is still named by both audits with the shared tables
    leaked = next(iter(first.layers.values())).layer_id
    weight = dict(model.named_modules())[leaked].weight.detach()
    for protected in (first, second):
        assert protected.audit is not None
        protected.audit.observe("run", "elsewhere", weight[:3].clone() * -2.5)
        assert any("plaintext weight rows" in leak for leak in protected.audit.leaks)
    del first, second, ours, theirs, protected
    gc.collect()
    assert not any(key[0].startswith(leaked) for key in list(payload_match._SHARED_TABLES))


def _layer(seed: int = 60) -> tuple[torch.Tensor, torch.Tensor, Any, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    weight, bias = torch.randn(24, 16, generator=g), torch.randn(24, generator=g)
    from groupcover.rng import SecretRandom

    published, secret = GroupCoverScheme(4).obfuscate(weight, bias, SecretRandom.from_seed(seed))
    return weight, bias, secret, published


def test_a_verdict_made_ahead_is_taken_only_for_the_bytes_it_checked() -> None:
    """The publish checks a package's protect made stand in for the master's only when the
    payload is those bytes: a swapped-in plaintext weight under the clean verdict is caught."""
    weight, bias, secret, published = _layer()
    ahead = Audit(mode="groupcover")
    ahead.register_layer("l", weight, bias, secret)
    verdict = ahead.publish_verdict("l", published)
    assert verdict["leaks"] == [] and verdict["dtype"] == "float32"

    taken = Audit(mode="groupcover")
    taken.register_layer("l", weight, bias, secret)
    taken.accept_verdicts({"l": verdict})
    taken.observe("publish", "l", published.to(torch.float64))  # masked modes publish float64
    assert taken.verdicts_taken == 1 and taken.leaks == []

    swaps = {"plaintext": weight, "extra bits": published.to(torch.float64) + 1e-9,
             "rows moved": published[torch.randperm(24)]}  # fmt: skip
    for what, swapped in swaps.items():
        hostile = Audit(mode="groupcover")
        hostile.register_layer("l", weight, bias, secret)
        hostile.accept_verdicts({"l": verdict})
        hostile.observe("publish", "l", swapped)
        assert hostile.verdicts_taken == 0, what  # checked in full
        if what == "plaintext":
            assert any("published weight equals the plaintext weight" in m for m in hostile.leaks)


def test_a_verdict_made_ahead_carries_its_leaks() -> None:
    """A leaking publish found at protect time is reported by the master that takes the verdict,
    with the same messages the live checks raise."""
    weight, bias, secret, _ = _layer(61)
    ahead = Audit(mode="x")
    ahead.register_layer("l", weight, bias, secret)
    verdict = ahead.publish_verdict("l", weight)  # a scheme that publishes the plaintext
    live = Audit(mode="x")
    live.register_layer("l", weight, bias, secret)
    live.observe("publish", "l", weight)
    taken = Audit(mode="x")
    taken.register_layer("l", weight, bias, secret)
    taken.accept_verdicts({"l": verdict})
    taken.observe("publish", "l", weight)
    assert verdict["leaks"] and taken.verdicts_taken == 1
    assert taken.leaks == live.leaks == verdict["leaks"]


def test_the_printed_verdict_judges_the_figure_against_the_null() -> None:
    """The demo's figure (0.159 at 576 tokens x 384 features) prints beside the null's 99%
    quantile and its p-value, within the null, and says what the audit could have detected; a
    figure above the quantile is not called "no leak"."""
    from groupcover import leakage
    from groupcover.bench.report import audit_lines

    def result(figure: float) -> dict[str, Any]:
        row = {"features": 384, "tokens": 576, "max_abs_correlation": figure,
               **leakage.correlation_verdict(figure, 576, 384),
               "distinguisher_advantage": 0.01, "distinguisher_trials": 576}  # fmt: skip
        audit = {"leaks": [], "input_exposed": False, "check_s": 0.1, "leakage": [row]}
        return {"mode": "groupcover", "audit": audit}

    (within,) = audit_lines([result(0.159)])
    assert within.startswith("audit groupcover: no leak;")
    assert "null 99% quantile 0.1742, p = 0.0476: within the null" in within
    assert "detects |corr| >= 0.24 with 95% power" in within
    assert "|corr| 0.01 needs 342,124 tokens" in within
    (above,) = audit_lines([result(0.2)])
    assert "no leak;" not in above and "above the null at 384 features" in above
