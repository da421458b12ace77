"""The fused passes (groupcover.kernels) against the torch path they replace: the same integers
(payloads, wraps, corrected residues), the same outputs, and the check's sums within rounding,
in both memory layouts; refusals decided by the torch path."""

from __future__ import annotations

import pytest
import torch

from groupcover import kernels, modular
from groupcover.layer_op import LayerOp, apply_op, with_quantum
from groupcover.masks import MaskPool
from groupcover.modular import MaskRangeError
from groupcover.rng import SecretRandom

pytestmark = pytest.mark.skipif(not kernels.available(), reason="numba is not installed")


def _layer(out: int = 48, features: int = 40, transposed: bool = False, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    weight = (torch.randn(out, features, generator=generator) * 0.1).to(torch.float64)
    op = LayerOp("linear", params={"transposed": 1} if transposed else {})
    op = with_quantum(op, modular.quantum_exponent(weight, op))
    pool = MaskPool(SecretRandom.from_seed(seed))
    pool.register("layer", weight, op)
    return pool, weight, op, generator


def _input(generator: torch.Generator, features_first: bool, rows: int = 512, features: int = 40):
    x = torch.randn(rows, features, generator=generator)
    x[3, 5] = 7.5  # a large element: more wraps
    if features_first:
        x = x.t().contiguous().t()
    return x


@pytest.mark.parametrize("features_first", [False, True])
@pytest.mark.parametrize("transposed", [False, True])
def test_the_fused_passes_compute_what_the_torch_path_computes(
    features_first: bool, transposed: bool
) -> None:
    pool, weight, op, generator = _layer(transposed=transposed)
    x = _input(generator, features_first)
    pool.calibrate("layer", x)  # 20480 elements: a few wraps per call
    v = torch.randn(40, dtype=torch.float64, generator=generator)
    s = torch.rand(48, dtype=torch.float64, generator=generator) + 1
    wrapped_calls = 0
    for _ in range(6):
        pair = pool.take("layer", tuple(x.shape), x)
        fused = pool.blind("layer", x, pair, check_v=v)
        assert fused.fixed is None and fused.rhs is not None  # the fused pass ran
        plain = pool.blind("layer", x, pair)
        assert plain.fixed is not None
        assert torch.equal(fused.payload, plain.payload)
        assert fused.payload.stride() == x.stride()
        assert fused.peak == plain.peak
        expected_rhs = plain.fixed.to(torch.float64) @ v
        assert torch.allclose(fused.rhs, expected_rhs, rtol=1e-12, atol=1e-6)
        if plain.wraps is None:
            assert fused.wraps is None
            continue
        wrapped_calls += 1
        assert fused.wraps is not None
        order = torch.argsort(fused.wraps[0])
        assert torch.equal(fused.wraps[0][order], plain.wraps[0])
        assert torch.equal(fused.wraps[1][order], plain.wraps[1])
        # the worker's residues, corrected and unmasked both ways
        y = apply_op(op, fused.payload, weight)
        a = pool.unblind("layer", y.clone(memory_format=torch.preserve_format), pair.u,
                         fused, check_s=s)  # fmt: skip
        b = pool.unblind("layer", y.clone(memory_format=torch.preserve_format), pair.u, plain)
        assert a.lhs is not None and a.quanta is None and b.quanta is not None
        assert torch.equal(a.output, b.output)
        assert a.output.stride() == b.output.stride()
        assert a.peak == b.peak
        assert torch.equal(a.wraps, b.wraps)
        assert torch.allclose(a.lhs, b.quanta @ s, rtol=1e-12, atol=1e-3)
        # and it is op(X, W'') in quanta: the masks and wraps are gone
        exact = plain.fixed.to(torch.float64) @ weight.t() * 2.0 ** -pool.exponent("layer")
        assert (b.quanta - exact).abs().max() <= 1.0 + 1e-6
    assert wrapped_calls >= 1  # the correction ran


def test_without_numba_the_torch_path_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    pool, _weight, _op, generator = _layer()
    x = _input(generator, False)
    v = torch.randn(40, dtype=torch.float64, generator=generator)
    pair = pool.take("layer", tuple(x.shape), x)
    monkeypatch.setattr(kernels, "numba", None)
    blinded = pool.blind("layer", x, pair, check_v=v)
    assert blinded.fixed is not None and blinded.rhs is None


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 1e12])
def test_a_non_finite_or_huge_input_is_refused_not_sent(bad: float) -> None:
    pool, _weight, _op, generator = _layer()
    x = _input(generator, False)
    pool.calibrate("layer", x)
    x[2, 2] = bad
    pair = pool.take("layer", tuple(x.shape), x)
    with pytest.raises(MaskRangeError, match="layer"):
        pool.blind("layer", x, pair, check_v=torch.ones(40, dtype=torch.float64))


def test_one_changed_residue_is_caught_on_the_fused_path() -> None:
    from groupcover.errors import IntegrityError
    from groupcover.integrity import LayerCheck

    pool, weight, op, generator = _layer(transposed=True)
    check = LayerCheck.create("layer", weight, op, SecretRandom.from_seed(1))
    x = _input(generator, True)
    pool.calibrate("layer", x)
    for change in (0, 4096):
        pair = pool.take("layer", tuple(x.shape), x)
        blinded = pool.blind("layer", x, pair, check_v=check.v)
        y = apply_op(op, blinded.payload, weight)
        y[5, 7] += change  # the worker moves one element of one result
        result = pool.unblind("layer", y, pair.u, blinded, check_s=check.s)
        if change == 0:
            check.check_quanta(blinded, result)
        else:
            with pytest.raises(IntegrityError, match="integrity check failed"):
                check.check_quanta(blinded, result)


@pytest.mark.parametrize("fused", [False, True])
def test_a_batch_of_one_in_features_first_memory(
    fused: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A (1, rows, features) input whose size-1 dimension has an arbitrary stride (torch gives
    one): wraps are found and corrected at the right row, on either path."""
    if not fused:
        monkeypatch.setattr(kernels, "numba", None)
    pool, weight, op, generator = _layer(transposed=True)
    table = torch.randn(40, 512, generator=generator)  # features-first memory
    x = table.t().unsqueeze(0).as_strided((1, 512, 40), (1, 1, 512))
    pool.calibrate("layer", x)
    s = torch.rand(48, dtype=torch.float64, generator=generator) + 1
    v = torch.randn(40, dtype=torch.float64, generator=generator)
    exact = x.double() * pool.input_scale("layer")
    exact = exact.round() @ weight.t() * 2.0 ** -pool.exponent("layer")
    wrapped = 0
    for _ in range(4):
        pair = pool.take("layer", tuple(x.shape), x)
        blinded = pool.blind("layer", x, pair, check_v=v)
        assert (blinded.rhs is not None) == fused
        wrapped += blinded.wraps is not None
        y = apply_op(op, blinded.payload, weight)
        result = pool.unblind("layer", y, pair.u, blinded, check_s=s)
        quanta = result.output.double() / pool.output_factor("layer")
        # one quantum (two roundings), plus the float32 output's own rounding
        assert (quanta - exact).abs().max() <= 1.0 + exact.abs().max() * 2**-23
    assert wrapped >= 1


@pytest.mark.parametrize("fused", [False, True])
def test_the_result_range_follows_each_calls_row_norms(
    fused: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Linear results take 31 bits of the worst case: a call whose rows could exceed it (every
    element of a row at +-2B) is refused; inputs up to B with the spread of real activations
    pass (their rows' norms are measured), and their results are exact to one quantum."""
    if not fused:
        monkeypatch.setattr(kernels, "numba", None)
    pool, weight, op, generator = _layer()
    v = torch.ones(40, dtype=torch.float64)
    pool.calibrate("layer", torch.full((1, 40), 4.0))  # B = 4
    typical = torch.randn(512, 40, generator=generator).clamp(-4, 4)
    pair = pool.take("layer", tuple(typical.shape), typical)
    blinded = pool.blind("layer", typical, pair, check_v=v)  # peak near B: norms measured
    y = apply_op(op, blinded.payload, weight)
    result = pool.unblind("layer", y, pair.u, blinded, check_s=torch.ones(48, dtype=torch.float64))
    exact = (typical.double() * pool.input_scale("layer")).round() @ weight.t()
    quanta = result.output.double() / pool.output_factor("layer")
    assert (quanta - exact * 2.0 ** -pool.exponent("layer")).abs().max() <= 1.0 + 2.0**10
    worst = torch.sign(weight[:1].float()).expand(512, 40) * 8.0  # rows at +-2B
    pair = pool.take("layer", tuple(worst.shape), worst)
    with pytest.raises(MaskRangeError, match="would not fit 32 bits"):
        pool.blind("layer", worst, pair, check_v=v)
