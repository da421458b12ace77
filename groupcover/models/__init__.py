"""The models the benchmark runs, by name: `load_model(name, seed) -> (model, example_input_fn)`.

`example_input_fn(batch, seq)` returns the forward's arguments: token ids and attention mask for
the encoders, source and target ids for the seed transformer, images of side `seq` for ResNet-18.
Random weights are seeded; keyword overrides (for example `layers=2, hidden=64`) give small
variants of the same architecture for fast tests.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from groupcover.errors import UsageError
from groupcover.models.bert import BertConfig, BertEncoder, random_token_inputs
from groupcover.models.minilm import example_sentences, load_minilm, tokenize
from groupcover.models.resnet18 import ResNet18
from groupcover.models.seed_transformer import SeedConfig, SeedTransformer
from groupcover.models.standin import load_standin

ExampleInputFn = Callable[[int, int], tuple[torch.Tensor, ...]]


@dataclass(frozen=True)
class ModelFactory:
    description: str
    build: Callable[..., tuple[nn.Module, ExampleInputFn]]


def as_tensor(output: Any) -> torch.Tensor:
    """A model's main output tensor (the first one of a tuple, list or mapping)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict):
        return as_tensor(next(iter(output.values())))
    if isinstance(output, list | tuple) and output:
        return as_tensor(output[0])
    raise TypeError(f"cannot take a tensor from a model output of type {type(output).__name__}")


def _seeded(seed: int, make: Callable[[], nn.Module]) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make().eval()


def _build_minilm(seed: int) -> tuple[nn.Module, ExampleInputFn]:
    def example(batch: int, seq: int) -> tuple[torch.Tensor, ...]:
        return tokenize(example_sentences(batch), seq)

    return load_minilm(), example


def _build_standin(seed: int, perturb_seed: int | None = None) -> tuple[nn.Module, ExampleInputFn]:
    """`seed` (the random-weight seed of the synthetic models) is ignored: the perturbation comes
    from the OS CSPRNG, fresh at every load, unless `perturb_seed` is given (then not secret)."""

    def example(batch: int, seq: int) -> tuple[torch.Tensor, ...]:
        return tokenize(example_sentences(batch), seq)

    return load_standin(perturb_seed), example


def _build_bert(seed: int, **overrides: Any) -> tuple[nn.Module, ExampleInputFn]:
    config = replace(BertConfig(), **overrides)
    model = _seeded(seed, lambda: BertEncoder(config))

    def example(batch: int, seq: int) -> tuple[torch.Tensor, ...]:
        generator = torch.Generator().manual_seed(seed)
        return random_token_inputs(config.vocab_size, batch, seq, generator)

    return model, example


def _build_seed(seed: int, **overrides: Any) -> tuple[nn.Module, ExampleInputFn]:
    config = replace(SeedConfig(), **overrides)
    model = _seeded(seed, lambda: SeedTransformer(config))

    def example(batch: int, seq: int) -> tuple[torch.Tensor, ...]:
        generator = torch.Generator().manual_seed(seed)
        src = torch.randint(0, config.vocab_size, (batch, seq), generator=generator)
        tgt = torch.randint(0, config.vocab_size, (batch, seq), generator=generator)
        return src, tgt

    return model, example


def _build_resnet(seed: int, **overrides: Any) -> tuple[nn.Module, ExampleInputFn]:
    model = _seeded(seed, lambda: ResNet18(**overrides))

    def example(batch: int, seq: int) -> tuple[torch.Tensor, ...]:
        generator = torch.Generator().manual_seed(seed)
        return (torch.randn(batch, 3, seq, seq, generator=generator),)

    return model, example


MODELS: dict[str, ModelFactory] = {
    "minilm": ModelFactory("MiniLM-L6 sentence embeddings, real weights", _build_minilm),
    "minilm-standin": ModelFactory(
        "stand-in secret: MiniLM-L6 with every encoder Linear perturbed by 2% (fresh per load)",
        _build_standin,
    ),
    "bert-base": ModelFactory("BERT-base-sized encoder, random weights", _build_bert),
    "seed-transformer": ModelFactory(
        "the seed's encoder-decoder (12+12 layers, 1x1 Conv1d FFN), random weights", _build_seed
    ),
    "resnet18": ModelFactory("ResNet-18-sized CNN (224x224 input), random weights", _build_resnet),
}


def load_model(name: str, seed: int = 0, **overrides: Any) -> tuple[nn.Module, ExampleInputFn]:
    factory = MODELS.get(name)
    if factory is None:
        raise UsageError(f"unknown model {name!r}", hint=f"choose one of {', '.join(MODELS)}")
    return factory.build(seed, **overrides)
