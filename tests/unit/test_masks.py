from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from groupcover import kernels
from groupcover.inprocess import InProcessTransport
from groupcover.integrity import LayerCheck
from groupcover.layer_op import HALF, MODULUS, RESIDUE_DTYPE, apply_op, with_quantum
from groupcover.masks import (
    MaskPair,
    MaskPolicy,
    MaskPool,
    MaskPoolExhausted,
    MaskReused,
)
from groupcover.master import protect
from groupcover.models import load_model
from groupcover.modular import INPUT_BITS, quantize, quantum_exponent
from groupcover.rng import SecretRandom
from groupcover.transport import LayerOp
from tests.unit.conftest import SMALL_BERT, rel_error


def quantized(weight: torch.Tensor, op: LayerOp) -> LayerOp:
    """The op a masked layer is registered with: int32 residues, its public result quantum."""
    return with_quantum(op, quantum_exponent(weight, op))


def residues(values: torch.Tensor) -> torch.Tensor:
    """Integers (any dtype holding them exactly) mod 2^32, as int64 in [-2^31, 2^31)."""
    return (values.to(torch.int64) + HALF) % MODULUS - HALF


def residue_gap(a: torch.Tensor, b: torch.Tensor) -> int:
    """The largest distance mod 2^32 between two tensors of integers."""
    return int(residues(a.to(torch.int64) - b.to(torch.int64)).abs().max())


def expected_u(r: torch.Tensor, weight: torch.Tensor, op: LayerOp) -> torch.Tensor:
    """round(op(r, W'') / q) mod 2^32, from the float op in float64 and int64 arithmetic."""
    if op.kind == "linear":
        y = F.linear(r.to(torch.float64), weight.to(torch.float64))
    else:
        y = F.conv2d(r.to(torch.float64), weight.to(torch.float64), None, op.stride, op.padding)
    return residues((y * 2.0 ** -op.params["quantum"]).round())


class EdgeRandom:
    """A stand-in for the masks' SecretRandom that draws every rho within 2^`bits` of +-2^31,
    so that X + rho wraps about half the time (real masks wrap with probability ~|X| / 2^32):
    it exercises the wraps' corrections everywhere."""

    def __init__(self, rng: SecretRandom, bits: int = 16) -> None:
        self.rng, self.bits = rng, bits

    def int32_uniform(self, count: int) -> torch.Tensor:
        r = self.rng.int32_uniform(count).to(torch.int64)
        near = r & ((1 << self.bits) - 1)
        return torch.where(r < 0, near - HALF, HALF - 1 - near).to(torch.int32)


def pool(policy: MaskPolicy = MaskPolicy.REFILL) -> tuple[MaskPool, torch.Tensor]:
    weight = torch.randn(12, 8, generator=torch.Generator().manual_seed(0)).double()
    masks = MaskPool(SecretRandom.from_seed(1), policy=policy)
    masks.register("fc", weight, quantized(weight, LayerOp("linear")))
    return masks, weight


def test_u_is_the_op_of_r_with_the_published_weight() -> None:
    """U = round(op(rho, W'') / q) mod 2^32: int32 residues, exact but for the rounding."""
    masks, weight = pool()
    masks.fill("fc", (3, 8), 1)
    pair = masks.take("fc", (3, 8))
    assert pair.r.dtype == pair.u.dtype == RESIDUE_DTYPE and pair.u.shape == (3, 12)
    linear = quantized(weight, LayerOp("linear"))
    assert residue_gap(pair.u, expected_u(pair.r, weight, linear)) <= 1
    conv_weight = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    conv = quantized(conv_weight, LayerOp("conv2d", stride=(1, 1), padding=(1, 1)))
    masks.register("conv", conv_weight, conv)
    pair = masks.take("conv", (2, 3, 5, 5))
    assert pair.r.dtype == pair.u.dtype == RESIDUE_DTYPE and pair.u.shape == (2, 4, 5, 5)
    assert residue_gap(pair.u, expected_u(pair.r, conv_weight, conv)) <= 1
    # not a product of anything else: another weight gives other residues
    assert residue_gap(pair.u, expected_u(pair.r, conv_weight.flip(0), conv)) > 1000


def test_pairs_are_single_use() -> None:
    masks, _ = pool()
    masks.fill("fc", (2, 8), 5)
    assert masks.available("fc", (2, 8)) == 5
    taken = [masks.take("fc", (2, 8)) for _ in range(5)]
    assert masks.available("fc", (2, 8)) == 0
    pointers = {pair.r.data_ptr() for pair in taken}
    assert len(pointers) == 5
    for i, first in enumerate(taken):
        for second in taken[i + 1 :]:
            assert bool((first.r != second.r).all())  # fresh: no entry shared (2^-32 each)
    stats = masks.stats()
    assert stats["used"] == 5 and stats["left"] == 0
    assert stats["online_refill"] == {"seconds": 0.0, "pairs": 0, "bytes": 0}


def test_pools_are_per_shape() -> None:
    masks, _ = pool()
    masks.fill("fc", (2, 8), 1)
    assert masks.available("fc", (4, 8)) == 0
    assert masks.take("fc", (4, 8)).r.shape == (4, 8)  # refilled online
    assert masks.available("fc", (2, 8)) == 1


def test_dry_pool_refills_online_and_counts_it() -> None:
    masks, _ = pool(MaskPolicy.REFILL)
    masks.fill("fc", (2, 8), 1)
    first = masks.take("fc", (2, 8))
    masks.take("fc", (2, 8))
    stats = masks.stats()
    assert stats["offline"]["pairs"] == 1
    assert first.edges is not None
    edge_bytes = first.edges.numel() * first.edges.element_size()
    assert stats["offline"]["bytes"] == (2 * 8 + 2 * 12) * 4 + edge_bytes  # int32, and the edges
    assert masks.pair_bytes("fc", (2, 8)) == (2 * 8 + 2 * 12) * 4
    assert stats["offline"]["seconds"] > 0
    assert stats["online_refill"]["pairs"] == 1
    assert stats["online_refill"]["seconds"] > 0


def test_dry_pool_raises_under_error_policy() -> None:
    masks, _ = pool(MaskPolicy.ERROR)
    masks.fill("fc", (2, 8), 1)
    masks.take("fc", (2, 8))
    with pytest.raises(MaskPoolExhausted, match="no input mask left") as info:
        masks.take("fc", (2, 8))
    assert info.value.hint


def test_protected_forward_uses_a_fresh_mask_per_call() -> None:
    model, example = load_model("bert-base", 0, **SMALL_BERT)
    inputs = example(2, 8)
    transport = InProcessTransport()
    sent: list[torch.Tensor] = []
    transport.add_observer(
        lambda event, layer, t: (
            sent.append(t) if (event, layer) == ("run", "layer.0.ffn1") else None
        )
    )
    protected = protect(
        model,
        transport,
        scheme="groupcover",
        masked=True,
        seed=3,
        mask_pool=2,
        example_inputs=inputs,
        mask_policy="error",
    )
    stats = protected.masks.stats()
    assert stats["offline"]["pairs"] == 2 * len(protected.layers)
    with torch.no_grad():
        reference = model(*inputs)
    for _ in range(2):
        assert rel_error(protected(*inputs), reference) < 1e-4
    assert len(sent) == 2 and all(t.dtype == torch.int32 for t in sent)
    assert float((sent[0] != sent[1]).double().mean()) > 0.99  # same input, other payload
    with pytest.raises(MaskPoolExhausted):
        protected(*inputs)


def test_masks_take_the_memory_layout_of_the_input() -> None:
    masks, weight = pool()
    like = torch.randn(8, 3, 4).movedim(0, -1)  # (3, 4, 8), features-first, float32
    masks.fill("fc", (3, 4, 8), 1, like=like)
    pair = masks.take("fc", (3, 4, 8))
    assert pair.r.shape == (3, 4, 8) and pair.r.stride() == like.stride()
    linear = quantized(weight, LayerOp("linear"))
    assert residue_gap(pair.u, expected_u(pair.r, weight, linear)) <= 1


def test_a_pair_hands_out_its_tensors_once() -> None:
    masks, _ = pool()
    masks.fill("fc", (2, 8), 1)
    pair = masks.take("fc", (2, 8))
    assert isinstance(pair, MaskPair) and not pair.used
    r, u = pair.consume()
    assert pair.used and r is pair.r and u is pair.u
    with pytest.raises(MaskReused, match="used twice"):
        pair.consume()


def test_masks_are_uniform_on_all_of_int32_and_far_larger_than_the_input() -> None:
    masks, _ = pool()
    x = 3.0 * torch.randn(512, 8, generator=torch.Generator().manual_seed(2))  # |x| < 16 here
    masks.fill("fc", tuple(x.shape), 1, like=x)
    bound = masks.bound("fc")
    assert bound is not None and float(x.abs().max()) <= bound < 2 * float(x.abs().max())
    assert bound == 2.0 ** round(torch.log2(torch.tensor(bound)).item())  # a power of two
    assert masks.input_scale("fc") == 2.0**INPUT_BITS / bound  # |X| <= 2^22 within the bound
    pair = masks.take("fc", tuple(x.shape))
    r, u = pair.consume()
    assert r.dtype == u.dtype == torch.int32
    values = r.to(torch.int64)
    assert int(values.max()) > 0.99 * HALF and int(values.min()) < -0.99 * HALF  # all of int32
    assert abs(float(values.double().mean())) < 0.05 * HALF  # centred
    flat = values.flatten()
    ones = torch.stack([(flat >> bit) & 1 for bit in range(32)]).double().mean(dim=1)
    assert float((ones - 0.5).abs().max()) < 0.05  # every bit a fair coin, the low ones too
    blinded = masks.blind("fc", x, pair)
    assert blinded.peak <= 2.0**INPUT_BITS == 2.0**-9 * HALF  # |X|: at most 2^-9 of the mask
    masks.calibrate("fc", 1000 * x)  # the bound is set once: B never follows the input
    assert masks.bound("fc") == bound and masks.input_scale("fc") == 2.0**INPUT_BITS / bound


def test_seeded_masks_are_reproducible_and_default_ones_are_not() -> None:
    def first_mask(rng: SecretRandom) -> torch.Tensor:
        masks = MaskPool(rng)
        weight = torch.ones(3, 4)
        masks.register("fc", weight, quantized(weight, LayerOp("linear")), bound=1.0)
        return masks.take("fc", (2, 4)).r

    assert torch.equal(first_mask(SecretRandom.from_seed(5)), first_mask(SecretRandom.from_seed(5)))
    assert not torch.equal(first_mask(SecretRandom.from_os()), first_mask(SecretRandom.from_os()))


def test_payloads_are_exact_fixed_point_plus_a_full_mask_so_low_bits_say_nothing() -> None:
    """X = round(x 2^22 / B) is exact (a power-of-two scale, then one rounding) and P = X + rho
    mod 2^32 exactly. A mask that left P's low bits to X would show the worker which inputs
    are exactly zero (padding, ReLU) or tiny; rho's own low bits are uniform and hide them."""
    masks = MaskPool(SecretRandom.from_seed(7))
    weight = torch.randn(3, 64, dtype=torch.float64)
    masks.register("fc", weight, quantized(weight, LayerOp("linear")))
    x = 2 * torch.randn(1000, 64, generator=torch.Generator().manual_seed(7))  # not the global
    masks.calibrate("fc", x)
    x[::2] = 0  # exact zeros
    x[1::2] *= 1e-6  # small values: a step or two of the fixed point at most
    scale = masks.input_scale("fc")
    assert scale == 2.0**INPUT_BITS / masks.bound("fc")
    pair = masks.take("fc", tuple(x.shape))
    rho = pair.r.clone()
    blinded = masks.blind("fc", x, pair)
    fixed = blinded.fixed
    assert fixed is not None and torch.equal(fixed, quantize(x, scale))
    assert torch.equal(fixed, fixed.round())  # integers ...
    assert float((fixed.double() - x.double() * scale).abs().max()) <= 0.5  # ... x to half a step
    assert float(fixed[::2].abs().max()) == 0 and 0 < float(fixed[1::2].abs().max()) <= 2
    assert blinded.payload.dtype == torch.int32
    assert residue_gap(blinded.payload, fixed.to(torch.int64) + rho.to(torch.int64)) == 0
    low = 0xFF

    def low_bytes(payload: torch.Tensor) -> torch.Tensor:
        return payload.to(torch.int64) & low

    naive = fixed.to(torch.int64) + (rho.to(torch.int64) & ~low)  # a mask without low bits
    assert int(low_bytes(naive)[::2].max()) == 0 and int(low_bytes(naive)[1::2].max()) > 0
    for rows in (low_bytes(blinded.payload)[::2], low_bytes(blinded.payload)[1::2]):
        counts = torch.bincount(rows.flatten(), minlength=256)  # 32000 each: 125 per value
        assert int(counts.min()) > 60 and int(counts.max()) < 200  # zero rows look like others


def test_payloads_wrap_mod_2_32_and_results_stay_exact() -> None:
    """With masks drawn next to +-2^31 about half of X + rho wraps: the payload stays int32 and
    the master's corrections keep every result exact."""
    model, example = load_model("bert-base", 0, **SMALL_BERT)
    inputs = example(2, 8)
    with torch.no_grad():
        reference = model(*inputs)
    for scheme in ("identity", "groupcover"):
        transport = InProcessTransport()
        sent: list[torch.Tensor] = []

        def record(event: str, _: str, t: torch.Tensor, sent: list = sent) -> None:
            if event == "run":
                sent.append(t)

        transport.add_observer(record)
        protected = protect(model, transport, scheme=scheme, masked=True, example_inputs=inputs,
                            mask_pool=0)  # fmt: skip
        masks = protected.masks
        masks.rng = EdgeRandom(masks.rng)  # every pair is drawn online, next to +-2^31
        blind = masks.blind
        wrapped = [0, 0]

        def counting(*args, blind=blind, wrapped=wrapped, **kwargs):  # type: ignore[no-untyped-def]
            blinded = blind(*args, **kwargs)
            wrapped[0] += 0 if blinded.wraps is None else blinded.wraps[0].numel()
            wrapped[1] += blinded.payload.numel()
            return blinded

        masks.blind = counting
        for _ in range(3):
            assert rel_error(protected(*inputs), reference) < 1e-5
        assert wrapped[0] > 0.2 * wrapped[1]  # wraps everywhere
        assert len(sent) == 3 * len(protected.layers)
        assert all(t.dtype == torch.int32 for t in sent)
        assert protected.integrity_stats()["checked"] == 3 * len(protected.layers)


@pytest.mark.parametrize("fused", [False, True])
def test_blind_wraps_mod_2_32_and_the_correction_restores_the_product(fused: bool) -> None:
    """P = X + rho mod 2^32 with the wrapped elements listed (position, k); the worker's
    residues minus U, plus the wraps' corrections, are op(X, W'') in quanta to one quantum per
    element and half a quantum per wrap, and pass the check. `fused`: the numba passes."""
    weight = torch.randn(12, 8, generator=torch.Generator().manual_seed(0)).double()
    op = quantized(weight, LayerOp("linear"))
    masks = MaskPool(EdgeRandom(SecretRandom.from_seed(1)))
    masks.register("fc", weight, op, bound=8.0)
    x = torch.randn(50, 8, generator=torch.Generator().manual_seed(3))
    check = LayerCheck.create("fc", masks.published_weight("fc"), op, SecretRandom.from_seed(2))
    scale, q = masks.input_scale("fc"), 2.0 ** masks.exponent("fc")
    assert scale == 2.0**INPUT_BITS / 8 and masks.exponent("fc") == op.params["quantum"]
    pair = masks.take("fc", (50, 8))
    rho, u = pair.consume()
    blinded = masks.blind("fc", x, pair, check.v if fused else None)
    assert (blinded.rhs is not None) == (fused and kernels.available())
    fixed = quantize(x.double(), scale)
    total = fixed.to(torch.int64) + rho.to(torch.int64)
    assert blinded.payload.dtype == torch.int32 and residue_gap(blinded.payload, total) == 0
    outside = torch.nonzero((total.flatten() >= HALF) | (total.flatten() < -HALF)).flatten()
    assert blinded.wraps is not None and outside.numel() > 100  # of 400 elements
    positions, k = blinded.wraps
    order = torch.argsort(positions)
    assert torch.equal(positions[order], outside)
    assert torch.equal(k[order], torch.where(total.flatten()[outside] >= HALF, 1, -1))
    y = apply_op(op, blinded.payload, masks.published_weight("fc"))  # the worker
    assert y.dtype == torch.int32
    exact = F.linear(fixed, weight) / q  # op(X, W'') in quanta
    uncorrected = residues(y.to(torch.int64) - u.to(torch.int64)).double()
    assert float((uncorrected - exact).abs().max()) > 1000  # the wraps matter
    unblinded = masks.unblind("fc", y, u, blinded, check.s if fused else None)
    assert unblinded.wraps is not None
    assert torch.equal(unblinded.wraps, torch.bincount(positions // 8, minlength=50))
    assert rel_error(unblinded.output, F.linear(x.double(), weight)) < 1e-6
    check.check_quanta(blinded, unblinded)
    if unblinded.quanta is not None:
        per_row = 1.0 + 0.5 * unblinded.wraps.double().unsqueeze(1)
        assert bool(((unblinded.quanta - exact).abs() <= per_row).all())
    else:
        assert fused and unblinded.lhs is not None
        per_row = (1.0 + 0.5 * unblinded.wraps.double()) * float(check.s.abs().sum())
        assert bool(((unblinded.lhs - exact @ check.s).abs() <= per_row).all())


def test_conv_wraps_are_corrected_over_their_footprint() -> None:
    """A convolution's wrapped input element reaches every output position of its window:
    the correction adds 2^32 op(k, W'') / q there, and those positions allow half a quantum
    more per wrap they took."""
    weight = torch.randn(4, 3, 3, 3, generator=torch.Generator().manual_seed(0)).double()
    op = quantized(weight, LayerOp("conv2d", stride=(1, 1), padding=(1, 1)))
    masks = MaskPool(EdgeRandom(SecretRandom.from_seed(1)))
    masks.register("conv", weight, op, bound=8.0)
    x = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(3))
    check = LayerCheck.create("conv", masks.published_weight("conv"), op,
                              SecretRandom.from_seed(2))  # fmt: skip
    pair = masks.take("conv", tuple(x.shape))
    _, u = pair.consume()
    blinded = masks.blind("conv", x, pair)
    assert blinded.wraps is not None and blinded.wraps[0].numel() > 20  # of 150 elements
    y = apply_op(op, blinded.payload, masks.published_weight("conv"))
    unblinded = masks.unblind("conv", y, u, blinded)
    fixed = quantize(x.double(), masks.input_scale("conv"))
    exact = F.conv2d(fixed, weight, padding=1) / 2.0 ** masks.exponent("conv")
    assert unblinded.quanta is not None and unblinded.wraps is not None
    wrapped = torch.zeros(x.numel(), dtype=torch.float64)
    wrapped[blinded.wraps[0]] = 1.0
    footprint = F.conv2d(wrapped.view(x.shape), torch.ones(1, 3, 3, 3, dtype=torch.float64),
                         padding=1).squeeze(1)  # fmt: skip
    assert torch.equal(unblinded.wraps.double(), footprint)
    per_position = (1.0 + 0.5 * footprint).unsqueeze(1)
    assert bool(((unblinded.quanta - exact).abs() <= per_position).all())
    check.check_quanta(blinded, unblinded)
    assert rel_error(unblinded.output, F.conv2d(x.double(), weight, padding=1)) < 1e-6
