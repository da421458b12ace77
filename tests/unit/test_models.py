from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from groupcover.errors import UsageError
from groupcover.inprocess import InProcessTransport
from groupcover.models import MODELS, load_model
from groupcover.models.minilm import tokenize
from groupcover.modes import MODES, build_for_mode
from tests.unit.conftest import rel_error

PARAPHRASES = (
    "A man is playing a guitar.",
    "Someone is strumming a guitar.",
    "The stock market crashed today.",
    "Share prices fell sharply this afternoon.",
)


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def minilm() -> nn.Module:
    model, _ = load_model("minilm", 0)
    return model


def embed(model: nn.Module, sentences: tuple[str, ...] | list[str], seq: int = 128):
    with torch.no_grad():
        return model(*tokenize(sentences, seq))


def test_registry_and_unknown_name() -> None:
    assert set(MODELS) == {"minilm", "minilm-standin", "bert-base", "seed-transformer", "resnet18"}
    with pytest.raises(UsageError, match="unknown model"):
        load_model("gpt-5")


def test_minilm_paraphrases_are_closer_than_unrelated(minilm: nn.Module) -> None:
    emb = embed(minilm, PARAPHRASES)
    assert torch.allclose(emb.norm(dim=1), torch.ones(4), atol=1e-5)
    cos = emb @ emb.T
    assert cos[0, 1] > 0.6 and cos[2, 3] > 0.6
    assert cos[0, 1] > cos[0, 2] + 0.3 and cos[2, 3] > cos[1, 3] + 0.3


def test_minilm_mask_batch_and_seq_handling(minilm: nn.Module) -> None:
    alone = embed(minilm, [PARAPHRASES[0]])
    in_batch = embed(minilm, [PARAPHRASES[0], "a much longer sentence " * 8])
    shorter_pad = embed(minilm, [PARAPHRASES[0]], seq=32)
    assert F.cosine_similarity(alone, in_batch[:1]).item() > 0.99999
    assert F.cosine_similarity(alone, shorter_pad).item() > 0.99999
    ids, mask = tokenize([PARAPHRASES[0]], 128)
    assert ids.shape == (1, 128) and int(mask.sum()) < 20 and ids[0, 0].item() == 101  # [CLS]
    ids[0, mask[0] == 0] = 2000  # padded positions must not matter
    with torch.no_grad():
        assert F.cosine_similarity(minilm(ids, mask), alone).item() > 0.99999
    _, example = load_model("minilm", 0)
    ids, mask = example(8, 128)
    assert ids.shape == mask.shape == (8, 128)


@pytest.mark.parametrize("mode", MODES)
def test_minilm_protected_embeddings_match_plaintext(minilm: nn.Module, mode: str) -> None:
    inputs = tokenize(PARAPHRASES, 64)
    with torch.no_grad():
        reference = minilm(*inputs)
    built = build_for_mode(
        minilm, mode, InProcessTransport(), seed=5, audit=True, example_inputs=inputs
    )
    out = built(*inputs)
    assert F.cosine_similarity(out, reference).min().item() >= 0.99999
    assert rel_error(out, reference) <= 1e-4
    if mode == "groupcover":
        assert built.audit.report()["leaks"] == []
    if mode == "groupcover-nomask":  # the weights are hidden; the inputs are not
        leaks = built.audit.report()["leaks"]
        assert leaks and all("input exposed" in leak for leak in leaks)


def test_real_sizes() -> None:
    bert, _ = load_model("bert-base", 0)
    assert 105e6 < params(bert) < 115e6
    assert bert.layer[0].attention.qkv.weight.shape == (2304, 768)
    resnet, example = load_model("resnet18", 0)
    assert 11e6 < params(resnet) < 12.5e6
    assert resnet(*example(1, 224)).shape == (1, 1000)
    seed, _ = load_model("seed-transformer", 0)
    assert len(seed.encoder) == len(seed.decoder) == 12
    assert seed.encoder[0].ffn.conv1.weight.shape == (3072, 768, 1)


def test_seeded_construction_is_reproducible() -> None:
    first, example = load_model("bert-base", 7, layers=1, hidden=32, heads=2, intermediate=64)
    second, _ = load_model("bert-base", 7, layers=1, hidden=32, heads=2, intermediate=64)
    other, _ = load_model("bert-base", 8, layers=1, hidden=32, heads=2, intermediate=64)
    inputs = example(2, 8)
    assert torch.equal(first(*inputs), second(*inputs))
    assert not torch.allclose(first(*inputs), other(*inputs))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "batch", "seq"),
    [("bert-base", 2, 32), ("seed-transformer", 1, 16), ("resnet18", 1, 224)],
)
@pytest.mark.parametrize("mode", ["groupcover", "groupcover-nomask", "mask-only"])
def test_full_size_models_are_exact(name: str, batch: int, seq: int, mode: str) -> None:
    model, example = load_model(name, 0)
    inputs = example(batch, seq)
    with torch.no_grad():
        reference = model(*inputs)
    built = build_for_mode(model, mode, InProcessTransport(), seed=6)
    assert rel_error(built(*inputs), reference) <= 1e-4
