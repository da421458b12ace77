from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from groupcover.inprocess import InProcessTransport
from groupcover.masks import (
    MASK_BITS,
    MaskPair,
    MaskPolicy,
    MaskPool,
    MaskPoolExhausted,
    MaskReused,
)
from groupcover.master import protect
from groupcover.models import load_model
from groupcover.rng import SecretRandom
from groupcover.transport import LayerOp
from tests.unit.conftest import SMALL_BERT, rel_error


def pool(policy: MaskPolicy = MaskPolicy.REFILL) -> tuple[MaskPool, torch.Tensor]:
    weight = torch.randn(12, 8, generator=torch.Generator().manual_seed(0)).double()
    masks = MaskPool(SecretRandom.from_seed(1), policy=policy)
    masks.register("fc", weight, LayerOp("linear"))
    return masks, weight


def test_u_is_the_op_of_r_with_the_published_weight() -> None:
    masks, weight = pool()
    masks.fill("fc", (3, 8), 1)
    pair = masks.take("fc", (3, 8))
    assert rel_error(pair.u, F.linear(pair.r, weight)) < 1e-6
    conv_weight = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    masks.register("conv", conv_weight, LayerOp("conv2d", stride=(1, 1), padding=(1, 1)))
    pair = masks.take("conv", (2, 3, 5, 5))
    assert rel_error(pair.u, F.conv2d(pair.r, conv_weight, padding=1)) < 1e-6


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
            assert not torch.allclose(first.r, second.r)
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
    masks.take("fc", (2, 8))
    masks.take("fc", (2, 8))
    stats = masks.stats()
    assert stats["offline"]["pairs"] == 1
    assert stats["offline"]["bytes"] == (2 * 8 + 2 * 12) * 8  # float64
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
    assert len(sent) == 2 and not torch.allclose(sent[0], sent[1])
    with pytest.raises(MaskPoolExhausted):
        protected(*inputs)


def test_masks_take_the_memory_layout_of_the_input() -> None:
    masks, weight = pool()
    like = torch.randn(8, 3, 4).movedim(0, -1)  # (3, 4, 8), features-first, float32
    masks.fill("fc", (3, 4, 8), 1, like=like)
    pair = masks.take("fc", (3, 4, 8))
    assert pair.r.shape == (3, 4, 8) and pair.r.stride() == like.stride()
    assert rel_error(pair.u, F.linear(pair.r, weight)) < 1e-6


def test_a_pair_hands_out_its_tensors_once() -> None:
    masks, _ = pool()
    masks.fill("fc", (2, 8), 1)
    pair = masks.take("fc", (2, 8))
    assert isinstance(pair, MaskPair) and not pair.used
    r, u = pair.consume()
    assert pair.used and r is pair.r and u is pair.u
    with pytest.raises(MaskReused, match="used twice"):
        pair.consume()


def test_masks_are_float64_uniform_and_far_larger_than_the_input() -> None:
    masks, _ = pool()
    x = 3.0 * torch.randn(64, 8)  # |x| < 16 here
    masks.fill("fc", tuple(x.shape), 1, like=x)
    bound = masks.bound("fc")
    assert bound is not None and float(x.abs().max()) <= bound < 2 * float(x.abs().max())
    assert bound == 2.0 ** round(torch.log2(torch.tensor(bound)).item())  # a power of two
    radius = masks.mask_range("fc")
    assert radius == 2.0**MASK_BITS * bound
    r, u = masks.take("fc", tuple(x.shape)).consume()
    assert r.dtype == u.dtype == torch.float64
    assert float(r.abs().max()) <= radius and float(r.abs().max()) > 0.9 * radius
    assert abs(float(r.mean())) < 0.1 * radius  # centred
    masks.calibrate("fc", 1000 * x)  # the bound is set once: R never follows the input
    assert masks.bound("fc") == bound


def test_seeded_masks_are_reproducible_and_default_ones_are_not() -> None:
    def first_mask(rng: SecretRandom) -> torch.Tensor:
        masks = MaskPool(rng)
        masks.register("fc", torch.ones(3, 4), LayerOp("linear"), bound=1.0)
        return masks.take("fc", (2, 4)).r

    assert torch.equal(first_mask(SecretRandom.from_seed(5)), first_mask(SecretRandom.from_seed(5)))
    assert not torch.equal(first_mask(SecretRandom.from_os()), first_mask(SecretRandom.from_os()))


def test_payloads_lie_on_the_mask_grid_so_low_bits_say_nothing() -> None:
    """Without the fixed-point encoding, x + r keeps x mod delta in its low bits wherever
    |x + r| < R/2: the worker would see which inputs are exactly zero (padding, ReLU)."""
    masks = MaskPool(SecretRandom.from_os())
    masks.register("fc", torch.randn(3, 64, dtype=torch.float64), LayerOp("linear"))
    x = 2 * torch.randn(1000, 64)
    masks.calibrate("fc", x)
    x[::2] = 0  # exact zeros
    x[1::2] *= 1e-6  # small values: float32 bits below the grid step
    delta = masks.quantum("fc")
    assert delta == masks.mask_range("fc") * 2.0**-52
    r, _ = masks.take("fc", tuple(x.shape)).consume()

    def off_grid(payload: torch.Tensor) -> torch.Tensor:
        steps = payload / delta
        return (steps - steps.round()).abs().amax(dim=1)

    naive = x.double() + r
    assert float(off_grid(naive)[::2].max()) == 0 and float(off_grid(naive)[1::2].min()) > 0
    payload = masks.encode("fc", x) + r
    assert float(off_grid(payload).max()) == 0  # zero and non-zero rows look alike
    assert float((masks.encode("fc", x) - x.double()).abs().max()) <= delta / 2


def test_payloads_wrap_into_the_mask_range_and_results_stay_exact() -> None:
    """With R shrunk to the input's own scale most elements wrap: the payload stays inside
    [-R, R) and the master's correction keeps every result exact."""
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
        protected = protect(model, transport, scheme=scheme, masked=True, example_inputs=inputs)
        protected.masks.scale = 2.0**-MASK_BITS  # R = B: wraps everywhere (pairs drawn online)
        for _ in range(3):
            assert rel_error(protected(*inputs), reference) < 1e-5
        radius = {name: protected.masks.mask_range(name) for name in protected.layers}
        late = sent[-len(protected.layers) :]
        assert all(t.dtype == torch.float64 for t in late)
        assert all(float(t.abs().max()) <= r for t, r in zip(late, radius.values(), strict=True))


def test_blind_reduces_mod_2r_and_the_correction_restores_the_product() -> None:
    masks, weight = pool()
    x = torch.randn(50, 8)
    masks.register("fc", weight, LayerOp("linear"), bound=4.0)
    masks.scale = 2.0**-MASK_BITS / 4  # R = 1: about a third of x + r wraps
    r, u = masks.take("fc", (50, 8)).consume()
    payload, wraps = masks.blind("fc", x, r)
    assert wraps is not None and int(wraps.abs().sum()) > 10
    assert float(payload.abs().max()) <= 1.0 and float(payload.max()) < 1.0
    y = F.linear(payload, weight) - (u - masks.correction("fc", wraps))
    assert rel_error(y, F.linear(x.double(), weight)) < 1e-12
