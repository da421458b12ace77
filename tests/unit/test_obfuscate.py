from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from groupcover.errors import UsageError
from groupcover.layer_op import apply_op
from groupcover.obfuscate import (
    DEFAULT_COND_BOUND,
    bench_deobfuscation,
    draw_mixing,
    group_rows,
    obfuscate_layer,
)
from groupcover.rng import SecretRandom
from groupcover.schemes import SCHEMES, GroupCoverScheme, IdentityScheme, make_scheme
from groupcover.transport import LayerOp, Transport
from tests.unit.conftest import rel_error


def gen(seed: int = 0) -> torch.Generator:
    """For the test's data (weights, inputs): never for secrets."""
    return torch.Generator().manual_seed(seed)


def secrets(seed: int = 0) -> SecretRandom:
    return SecretRandom.from_seed(seed)


@pytest.mark.parametrize("out", [1, 2, 3, 5, 7, 16, 66, 130, 257])
@pytest.mark.parametrize("k", [2, 4, 8])
def test_grouping_covers_every_row_exactly_once(out: int, k: int) -> None:
    groups = group_rows(torch.randn(out, 12, generator=gen(out)), k)
    rows = sorted(row for group in groups for row in group)
    assert rows == list(range(out))
    assert all(1 <= len(group) <= k for group in groups)
    assert len(groups) >= math.ceil(out / k)
    if out % k == 0:
        assert all(len(group) == k for group in groups)


def test_grouping_puts_dissimilar_rows_together() -> None:
    # four clusters of four nearly equal rows: each group should take one row of every cluster
    centres = torch.randn(4, 32, generator=gen(1))
    rows = centres.repeat_interleave(4, dim=0) + 0.01 * torch.randn(16, 32, generator=gen(2))
    for group in group_rows(rows, 4):
        assert sorted(row // 4 for row in group) == [0, 1, 2, 3]


def test_mixing_condition_bound_and_entries() -> None:
    mixing = draw_mixing(2000, 4, secrets(3), cond_bound=50.0)
    assert float(torch.linalg.cond(mixing).max()) <= 50.0
    assert mixing.min() >= 1 and mixing.max() <= 99
    assert torch.equal(mixing, mixing.round())


def test_mixing_is_neither_orthogonal_nor_near_identity() -> None:
    layer = obfuscate_layer(torch.randn(64, 32, generator=gen(4)), 4, secrets(5))
    for a in layer.mixing:
        gram = a.T @ a
        off_gram = gram - torch.diag(torch.diag(gram))
        assert off_gram.norm() / gram.norm() > 0.3  # far from orthogonal columns
        off = a - torch.diag(torch.diag(a))
        assert off.norm() / a.norm() > 0.3  # far from the identity (or a diagonal)
        assert float(torch.linalg.cond(a)) <= DEFAULT_COND_BOUND


def test_published_rows_are_not_matchable_by_cosine() -> None:
    weight = torch.randn(128, 64, generator=gen(6))
    layer = obfuscate_layer(weight, 4, secrets(7))
    unpermuted = torch.empty_like(layer.published)
    unpermuted[:, layer.in_perm] = layer.published
    cos = F.normalize(unpermuted, dim=1) @ F.normalize(weight, dim=1).T
    best = cos.abs().amax(dim=1)
    assert float(best.max()) < 0.999  # the payload audit's limit
    assert float(best.median()) < 0.8  # a typical row is far from every plaintext row


def test_reproducible_by_seed() -> None:
    weight, bias = torch.randn(40, 24, generator=gen(8)), torch.randn(40, generator=gen(9))
    scheme = GroupCoverScheme(4)
    first, secret1 = scheme.obfuscate(weight, bias, secrets(10))
    second, secret2 = scheme.obfuscate(weight, bias, secrets(10))
    other, _ = scheme.obfuscate(weight, bias, secrets(11))
    assert torch.equal(first, second)
    for name, tensor in secret1.tensors().items():
        assert torch.equal(tensor, secret2.tensors()[name])
    assert not torch.allclose(first, other)


def test_input_permutation_is_applied() -> None:
    weight = torch.randn(16, 32, generator=gen(12))
    scheme = GroupCoverScheme(4)
    published, secret = scheme.obfuscate(weight, None, secrets(13))
    assert secret.in_perm is not None
    assert not torch.equal(secret.in_perm, torch.arange(32))
    assert sorted(secret.in_perm.tolist()) == list(range(32))
    x = torch.randn(5, 32, generator=gen(14))
    assert torch.equal(scheme.prepare_input(x, secret), x[:, secret.in_perm])
    exact = scheme.restore(F.linear(scheme.prepare_input(x, secret), published), secret)
    unpermuted = scheme.restore(F.linear(x, published), secret)
    assert rel_error(exact, F.linear(x, weight)) < 1e-5
    assert rel_error(unpermuted, F.linear(x, weight)) > 0.1


@pytest.mark.parametrize("out", [1, 3, 4, 6, 33, 64])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("k", [2, 4, 8])
def test_linear_round_trip_with_tails(out: int, with_bias: bool, k: int) -> None:
    weight = torch.randn(out, 20, generator=gen(out))
    bias = torch.randn(out, generator=gen(out + 1)) if with_bias else None
    x = torch.randn(3, 7, 20, generator=gen(15))
    scheme = GroupCoverScheme(k)
    published, secret = scheme.obfuscate(weight, bias, secrets(16))
    assert published.shape == weight.shape
    y = F.linear(scheme.prepare_input(x, secret), published)
    assert rel_error(scheme.restore(y, secret), F.linear(x, weight, bias)) < 1e-5


def test_masked_round_trip_subtracts_u() -> None:
    weight, bias = torch.randn(10, 8, generator=gen(17)), torch.randn(10, generator=gen(18))
    x, r = torch.randn(4, 8, generator=gen(19)), torch.randn(4, 8, generator=gen(20))
    for scheme in (GroupCoverScheme(4), IdentityScheme()):
        published, secret = scheme.obfuscate(weight, bias, secrets(21))
        y = F.linear(scheme.prepare_input(x, secret) + r, published)
        out = scheme.restore(y, secret, mask_u=F.linear(r, published))
        assert rel_error(out, F.linear(x, weight, bias)) < 1e-5


def test_conv_round_trips() -> None:
    scheme = GroupCoverScheme(4)
    weight2d, bias = torch.randn(10, 6, 3, 3, generator=gen(22)), torch.randn(10, generator=gen(23))
    x = torch.randn(2, 6, 9, 9, generator=gen(24))
    published, secret = scheme.obfuscate(weight2d, bias, secrets(25))
    y = F.conv2d(scheme.prepare_input(x, secret), published, stride=2, padding=1)
    ref = F.conv2d(x, weight2d, bias, stride=2, padding=1)
    assert rel_error(scheme.restore(y, secret), ref) < 1e-5
    r = torch.randn_like(x)
    u = F.conv2d(r, published, stride=2, padding=1)
    y = F.conv2d(scheme.prepare_input(x, secret) + r, published, stride=2, padding=1)
    assert rel_error(scheme.restore(y, secret, mask_u=u), ref) < 1e-5
    weight1d = torch.randn(13, 6, 1, generator=gen(26))
    bias1d = torch.randn(13, generator=gen(27))
    x1 = torch.randn(3, 6, 11, generator=gen(28))
    published, secret = scheme.obfuscate(weight1d, bias1d, secrets(29))
    y = F.conv1d(scheme.prepare_input(x1, secret), published)
    assert rel_error(scheme.restore(y, secret), F.conv1d(x1, weight1d, bias1d)) < 1e-5


def test_identity_scheme_publishes_the_weight_and_keeps_the_bias() -> None:
    weight, bias = torch.randn(6, 4), torch.randn(6)
    published, secret = IdentityScheme().obfuscate(weight, bias, secrets())
    assert torch.equal(published, weight)
    assert secret.in_perm is None and secret.bias is not None


def test_scheme_registry() -> None:
    assert {"identity", "groupcover"} <= set(SCHEMES)  # baselines join it (test_attacks.py)
    scheme = make_scheme("groupcover", k=8)
    assert isinstance(scheme, GroupCoverScheme) and scheme.k == 8
    with pytest.raises(UsageError, match="unknown scheme"):
        make_scheme("no-such-scheme")
    with pytest.raises(UsageError):
        GroupCoverScheme(3)


def test_bench_deobfuscation_reports_each_shape() -> None:
    rows = bench_deobfuscation([(64, 32), (32, 96)], batch=2, seq=8, repeat=2)
    assert [(r["in_features"], r["out_features"]) for r in rows] == [(64, 32), (32, 96)]
    for row in rows:
        assert row["linear_ms"] > 0 and row["restore_ms"] > 0
        assert row["ratio"] == pytest.approx(row["restore_ms"] / row["linear_ms"])


def is_features_first(t: torch.Tensor) -> bool:
    return not t.is_contiguous() and t.movedim(-1, 0).is_contiguous()


def test_transposed_linear_op_gives_f_linear_in_features_first_memory() -> None:
    weight = torch.randn(12, 20, generator=gen(40))
    x = torch.randn(3, 7, 20, generator=gen(41))
    op = GroupCoverScheme(4).worker_op(LayerOp("linear"))
    assert op.params == {"transposed": 1} and op.kind == "linear"
    y = apply_op(op, x, weight)
    assert y.shape == (3, 7, 12) and is_features_first(y)
    assert torch.allclose(y, F.linear(x, weight), rtol=1e-5, atol=1e-5)
    assert IdentityScheme().worker_op(LayerOp("linear")) == LayerOp("linear")
    conv = LayerOp("conv2d", stride=(1, 1))
    assert GroupCoverScheme(4).worker_op(conv) is conv


@pytest.mark.parametrize("out", [1, 3, 6, 33, 64])
@pytest.mark.parametrize("k", [2, 4, 8])
@pytest.mark.parametrize("masked", [False, True])
def test_round_trip_through_the_transposed_op(out: int, k: int, masked: bool) -> None:
    weight, bias = torch.randn(out, 20, generator=gen(out)), torch.randn(out, generator=gen(42))
    x, r = torch.randn(3, 7, 20, generator=gen(43)), torch.randn(3, 7, 20, generator=gen(44))
    scheme = GroupCoverScheme(k)
    published, secret = scheme.obfuscate(weight, bias, secrets(45))
    op = scheme.worker_op(LayerOp("linear"))
    reference = F.linear(x, weight, bias)
    for features_first in (False, True):
        sent = scheme.prepare_input(x, secret) + (r if masked else 0)
        u = apply_op(op, r, published) if masked else None
        restored = scheme.restore(
            apply_op(op, sent, published), secret, u, features_first=features_first
        )
        assert restored.shape == reference.shape
        assert rel_error(restored, reference) < 1e-5
        if out > 1:
            assert is_features_first(restored) == features_first


def test_features_first_input_is_permuted_by_rows_and_keeps_its_layout() -> None:
    weight = torch.randn(16, 24, generator=gen(46))
    scheme = GroupCoverScheme(4)
    published, secret = scheme.obfuscate(weight, None, secrets(47))
    assert secret.in_perm is not None
    x = torch.randn(24, 2, 5, generator=gen(48)).movedim(0, -1)  # (2, 5, 24), features-first
    prepared = scheme.prepare_input(x, secret)
    assert is_features_first(prepared)
    assert torch.equal(prepared, x[..., secret.in_perm])
    op = scheme.worker_op(LayerOp("linear"))
    restored = scheme.restore(apply_op(op, prepared, published), secret)
    assert restored.is_contiguous() and rel_error(restored, F.linear(x, weight)) < 1e-5


def test_bench_reports_the_features_first_restore() -> None:
    (row,) = bench_deobfuscation([(32, 64)], batch=2, seq=8, repeat=2)
    assert row["restore_features_first_ms"] > 0
    assert row["ratio_features_first"] == pytest.approx(
        row["restore_features_first_ms"] / row["linear_ms"]
    )


def test_features_first_results_cross_the_transport(transport: Transport) -> None:
    weight = torch.randn(12, 20, generator=gen(50))
    transport.publish("fc", weight, GroupCoverScheme(4).worker_op(LayerOp("linear")))
    x = torch.randn(3, 7, 20, generator=gen(51))
    y = transport.run("fc", x)
    assert is_features_first(y)  # the de-mixing gathers from it without a transposed copy
    assert torch.allclose(y, F.linear(x, weight), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("out", [1, 3, 6, 33, 64])
@pytest.mark.parametrize("k", [2, 4, 8])
def test_grouped_kernel_gives_the_embedding_bag_values(out: int, k: int) -> None:
    """The batched-product de-mixing (chosen where torch has no AVX2 embedding_bag) restores
    the same outputs: row-major and features-first, masked and not, tails included."""
    weight, bias = torch.randn(out, 20, generator=gen(out)), torch.randn(out, generator=gen(46))
    x, r = torch.randn(3, 7, 20, generator=gen(47)), torch.randn(3, 7, 20, generator=gen(48))
    grouped, gathered = GroupCoverScheme(k), GroupCoverScheme(k)
    grouped.use_grouped_kernel(True)
    gathered.use_grouped_kernel(False)
    published, secret = grouped.obfuscate(weight, bias, secrets(49))
    op = grouped.worker_op(LayerOp("linear"))
    reference = F.linear(x, weight, bias)
    for features_first in (False, True):
        for masked in (False, True):
            outputs = []
            for scheme in (grouped, gathered):
                sent = scheme.prepare_input(x, secret) + (r if masked else 0)
                u = apply_op(op, r, published) if masked else None
                y = apply_op(op, sent, published)
                outputs.append(scheme.restore(y, secret, u, features_first=features_first))
            assert rel_error(outputs[0], reference) < 1e-5
            assert rel_error(outputs[0], outputs[1]) < 1e-6
            if out > 1:
                assert is_features_first(outputs[0]) == features_first
            assert outputs[0].is_contiguous() != features_first or out == 1


def test_grouped_kernel_restores_convolutions() -> None:
    scheme = GroupCoverScheme(4)
    scheme.use_grouped_kernel(True)
    weight2d, bias = torch.randn(10, 6, 3, 3, generator=gen(50)), torch.randn(10, generator=gen(51))
    x = torch.randn(2, 6, 9, 9, generator=gen(52))
    published, secret = scheme.obfuscate(weight2d, bias, secrets(53))
    r = torch.randn_like(x)
    u = F.conv2d(r, published, stride=2, padding=1)
    y = F.conv2d(scheme.prepare_input(x, secret) + r, published, stride=2, padding=1)
    ref = F.conv2d(x, weight2d, bias, stride=2, padding=1)
    assert rel_error(scheme.restore(y, secret, mask_u=u), ref) < 1e-5
    weight1d, bias1d = torch.randn(13, 6, 1, generator=gen(54)), torch.randn(13, generator=gen(55))
    x1 = torch.randn(3, 6, 11, generator=gen(56))
    published, secret = scheme.obfuscate(weight1d, bias1d, secrets(57))
    y = F.conv1d(scheme.prepare_input(x1, secret), published)
    assert rel_error(scheme.restore(y, secret), F.conv1d(x1, weight1d, bias1d)) < 1e-5


@pytest.mark.parametrize(("capability", "grouped"), [("DEFAULT", True), ("AVX2", False),
                                                      ("AVX512", False)])  # fmt: skip
def test_the_kernel_follows_the_cpu(
    monkeypatch: pytest.MonkeyPatch, capability: str, grouped: bool
) -> None:
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    scheme = GroupCoverScheme(4)
    _published, secret = scheme.obfuscate(torch.randn(8, 5, generator=gen(58)), None, secrets(59))
    assert (scheme._grouped_tables(secret) is not None) == grouped
