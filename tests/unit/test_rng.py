from __future__ import annotations

import copy
import math
import os
import pickle

import numpy as np
import pytest
import torch

from groupcover.rng import SecretRandom, seed_notice
from tests.unit.mt_clone import clone_torch_generator, predicts_next_words, words_from_int64


def test_default_generators_draw_different_secrets() -> None:
    first, second = SecretRandom.create(None), SecretRandom.from_os()
    assert not first.reproducible and first.seed is None
    assert "OS CSPRNG" in first.notice
    assert not torch.equal(first.randperm(64), second.randperm(64))
    assert first.random_bytes(32) != second.random_bytes(32)


def test_seeded_generators_are_reproducible_and_say_so() -> None:
    first, second = SecretRandom.create(7), SecretRandom.from_seed(7)
    assert first.reproducible and first.seed == 7
    assert first.notice == seed_notice(7) == "secrets reproducible from seed 7: not secret"
    assert torch.equal(first.uniform((5, 3)), second.uniform((5, 3)))
    assert torch.equal(first.integers(1, 100, (4, 4)), second.integers(1, 100, (4, 4)))
    assert not torch.equal(
        SecretRandom.from_seed(8).randperm(32), SecretRandom.from_seed(7).randperm(32)
    )
    assert "seed=7" in repr(first) and first.spawn("masks").seed == 7


def test_spawned_streams_are_independent_and_keyed_by_label() -> None:
    root = SecretRandom.from_seed(1)
    a, b, again = root.spawn("a"), root.spawn("b"), root.spawn("a")
    assert a.random_bytes(16) == again.random_bytes(16)
    assert a.random_bytes(16) != b.random_bytes(16)
    root.random_bytes(1000)  # the parent's use does not move its children
    assert root.spawn("a").random_bytes(16) == SecretRandom.from_seed(1).spawn("a").random_bytes(16)
    assert root.spawn("a").spawn("x").label == "a/x"


def test_a_generator_cannot_be_copied_or_pickled() -> None:
    rng = SecretRandom.from_os()
    for attempt in (copy.copy, copy.deepcopy, pickle.dumps):
        with pytest.raises(TypeError):
            attempt(rng)
    assert repr(rng) == "SecretRandom(os)"


def test_integers_are_in_range_and_unbiased() -> None:
    rng = SecretRandom.from_seed(2)
    draws = rng.integers(0, 3, 300_000)
    assert draws.dtype == torch.int64 and int(draws.min()) == 0 and int(draws.max()) == 2
    counts = torch.bincount(draws).double()
    chi2 = float(((counts - 1e5) ** 2 / 1e5).sum())
    assert chi2 < 20  # 2 degrees of freedom: p ~ 5e-5
    big = rng.integers(-(2**63), 2**63, 1000)  # the whole int64 range
    assert big.dtype == torch.int64 and int((big < 0).sum()) > 400
    assert torch.equal(rng.integers(5, 6, (3,)), torch.full((3,), 5))
    odd = rng.integers(-7, 2**62 + 3, 10_000)
    assert int(odd.min()) >= -7 and int(odd.max()) < 2**62 + 3
    with pytest.raises(ValueError):
        rng.integers(3, 3, 1)


def test_permutations_are_uniform() -> None:
    rng = SecretRandom.from_seed(3)
    perm = rng.randperm(1000)
    assert sorted(perm.tolist()) == list(range(1000)) and perm.dtype == torch.int64
    counts: dict[tuple[int, ...], int] = {}
    for _ in range(6000):
        key = tuple(rng.randperm(3).tolist())
        counts[key] = counts.get(key, 0) + 1
    assert len(counts) == 6
    chi2 = sum((n - 1000) ** 2 / 1000 for n in counts.values())
    assert chi2 < 25  # 5 degrees of freedom
    assert rng.randperm(0).numel() == 0 and rng.randperm(1).tolist() == [0]


def test_floats_have_a_full_mantissa() -> None:
    rng = SecretRandom.from_seed(4)
    u = rng.uniform(200_000)
    assert u.dtype == torch.float64 and float(u.min()) >= 0 and float(u.max()) < 1
    scaled = (u * 2.0**53).numpy()
    assert np.array_equal(scaled, np.round(scaled))
    assert float((scaled % 2).mean()) == pytest.approx(0.5, abs=0.01)  # the 53rd bit is random
    u32 = rng.uniform(100_000, dtype=torch.float32)
    bits = (u32.double() * 2.0**24).numpy()
    assert float((bits % 2).mean()) == pytest.approx(0.5, abs=0.02)
    span = rng.uniform((10, 10), -4.0, 4.0)
    assert span.shape == (10, 10) and float(span.abs().max()) <= 4.0
    z = rng.normal(200_000)
    assert abs(float(z.mean())) < 0.01 and abs(float(z.std()) - 1) < 0.01
    assert math.isfinite(float(z.abs().max()))
    s = rng.signs(10_000)
    assert set(s.unique().tolist()) == {-1.0, 1.0} and abs(float(s.mean())) < 0.05


def test_grid_uniform_fills_the_whole_grid_of_its_range() -> None:
    """The masks' law: k x radius 2^-52, k uniform in [-2^52, 2^52) (every bit of k random)."""
    rng = SecretRandom.from_seed(5)
    radius = 2.0**30
    r = rng.grid_uniform(400_000, radius)
    assert r.dtype == torch.float64 and r.shape == (400_000,)
    k = (r / (radius * 2.0**-52)).numpy()
    assert np.array_equal(k, np.round(k)) and k.min() >= -(2.0**52) and k.max() < 2.0**52
    ints = k.astype(np.int64)
    for bit in (0, 1, 25, 51, 52):  # low bits, middle bits, the top bit and the sign
        assert float(((ints >> bit) & 1).mean()) == pytest.approx(0.5, abs=0.01), bit
    assert abs(float(r.mean())) < 0.01 * radius
    assert float(r.abs().max()) <= radius and float(r.abs().max()) > 0.99 * radius
    assert not torch.equal(rng.grid_uniform(8, radius), rng.grid_uniform(8, radius))
    assert torch.equal(SecretRandom.from_seed(5).grid_uniform(16, 1.0),
                       SecretRandom.from_seed(5).grid_uniform(16, 1.0))  # fmt: skip


def test_mersenne_twister_attacker_clones_torch_generator_but_not_secret_random() -> None:
    """The attacker sees 2496 bytes of a generator's output (as a worker would from recovered
    integer mixing entries or any other exact secret) and must predict the next one-time mask.

    Against torch.Generator, even seeded from os.urandom, it rebuilds the Mersenne Twister's
    state and predicts the mask bit for bit, so it unmasks the input exactly. Against
    SecretRandom the same attack predicts nothing: AES-CTR output does not reveal the key.
    """
    x = torch.randn(64, 384)  # an input the mask must hide
    # the old generator: torch.Generator seeded from the OS
    victim = torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little"))
    seen = words_from_int64(torch.randint(-(2**63), 2**63 - 1, (312,), generator=victim))
    r = torch.randn(x.shape, generator=victim)
    payload = x + r
    guess = torch.randn(x.shape, generator=clone_torch_generator(seen))
    assert torch.equal(guess, r)
    assert torch.allclose(payload - guess, x, atol=1e-6)  # the input, recovered
    # the new one: the same 2496 bytes of output, the same attack
    rng = SecretRandom.from_os()
    seen = words_from_int64(rng.integers(-(2**63), 2**63, 312))
    following = words_from_int64(rng.integers(-(2**63), 2**63, 256))
    assert predicts_next_words(seen, following) == 0.0
    r = rng.uniform(x.shape, -1.0, 1.0)
    guess = torch.randn(x.shape, generator=clone_torch_generator(seen), dtype=torch.float64)
    recovered = (x + r) - guess
    corr = float(torch.corrcoef(torch.stack([recovered.flatten(), x.double().flatten()]))[0, 1])
    assert abs(corr) < 0.9  # x + r - guess is x plus noise of its own size: no exact recovery
    assert float((recovered - x).abs().max()) > 0.5
