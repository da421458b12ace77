"""What `protect` reads (SRC) and what the master rebuilds the model's skeleton from.

SRC is a Hugging Face BERT-family checkpoint folder (config.json, model.safetensors,
tokenizer.json), a built-in model name (`groupcover.models.MODELS`), or `FILE.py:FUNCTION`
returning `(torch.nn.Module, example input tuple)`. Each becomes a `ModelSpec`: a JSON-able
description (kind + config) that `build_skeleton` turns back into the module without its weights,
plus what the bundle needs (the tokenizer, the factory's source, fixed example inputs).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer
from torch import nn

from groupcover.errors import UsageError
from groupcover.models import MODELS, load_model
from groupcover.models.bert import BertConfig, BertEncoder, random_token_inputs
from groupcover.models.minilm import (
    SentenceEncoder,
    convert_state_dict,
    example_sentences,
    load_config,
    model_dir,
)
from groupcover.models.resnet18 import ResNet18
from groupcover.models.seed_transformer import SeedConfig, SeedTransformer

MODEL_SEED = 0  # the built-in models' random weights (as the benchmark always had them)
FACTORY_MODULE = "gcvm_model_factory"


@dataclass
class ModelSpec:
    kind: str  # bert | sentence-bert | seed-transformer | resnet18 | factory
    config: dict[str, Any] = field(default_factory=dict)
    name: str = ""  # what the owner called it (built-in name, folder name, FILE.py:FUNCTION)
    tokenizer: str | None = None  # tokenizer.json text (sentence-bert from a checkpoint)
    factory_source: str | None = None  # FILE.py's text (factory)
    factory_function: str | None = None
    fixed_inputs: tuple[torch.Tensor, ...] | None = None  # a factory's example input

    def public(self) -> dict[str, Any]:
        """What the public manifest says about the model (no weights, no tokenizer, no code)."""
        return {"kind": self.kind, "name": self.name, "config": self.config}


@dataclass
class Source:
    module: nn.Module
    spec: ModelSpec


def _bert_config(config: dict[str, Any]) -> Any:
    return BertConfig(**config)


def load_source(text: str) -> Source:
    """SRC -> the plaintext module and its spec; a bad SRC is one `UsageError`."""
    if text in MODELS:
        return _builtin(text)
    path = Path(text)
    if path.is_dir():
        return _checkpoint(path)
    if ":" in text and text.rsplit(":", 1)[0].endswith(".py"):
        return _factory(text)
    raise UsageError(
        f"unknown model {text!r}",
        hint="give a Hugging Face BERT checkpoint folder (config.json, model.safetensors, "
        f"tokenizer.json), FILE.py:FUNCTION, or one of {', '.join(MODELS)}",
    )


def _builtin(name: str) -> Source:
    module, _ = load_model(name, MODEL_SEED)
    config: Any = getattr(module, "config", None)
    if name in ("minilm", "minilm-standin"):  # the stand-in: MiniLM's config and tokenizer
        settings = dataclasses.asdict(load_config(model_dir()))
        tokenizer = (model_dir() / "tokenizer.json").read_text()
        return Source(module, ModelSpec("sentence-bert", settings, name, tokenizer=tokenizer))
    if name == "bert-base":
        return Source(module, ModelSpec("bert", dataclasses.asdict(config), name))
    if name == "seed-transformer":
        return Source(module, ModelSpec("seed-transformer", dataclasses.asdict(config), name))
    if name == "resnet18":
        return Source(module, ModelSpec("resnet18", {}, name))
    # a model registered at run time (tests): its factory is the name itself
    return Source(module, ModelSpec("builtin", {}, name))


def _checkpoint(path: Path) -> Source:
    missing = [n for n in ("config.json", "model.safetensors", "tokenizer.json")
               if not (path / n).is_file()]  # fmt: skip
    if missing:
        raise UsageError(
            f"{path} is not a BERT checkpoint folder: no {', '.join(missing)}",
            hint="a Hugging Face BERT-family folder holds config.json, model.safetensors and "
            "tokenizer.json",
        )
    try:
        config = load_config(path)
        raw = load_file(str(path / "model.safetensors"))
        tokenizer = (path / "tokenizer.json").read_text()
        json.loads(tokenizer)
        encoder = BertEncoder(config)
        state = convert_state_dict({k.removeprefix("bert."): v for k, v in raw.items()},
                                   config.layers)  # fmt: skip
        encoder.load_state_dict(state, strict=True)
    except Exception as exc:  # the owner's files: any failure is one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(
            f"{path} is not a BERT checkpoint gcvm can read: {first[:200]}",
            hint="expected a BERT-family config.json and weights named like "
            "encoder.layer.N.attention.self.query.weight",
        ) from None
    spec = ModelSpec("sentence-bert", dataclasses.asdict(config), path.name, tokenizer=tokenizer)
    return Source(SentenceEncoder(encoder).eval(), spec)


def _load_factory_module(source: str, filename: str) -> types.ModuleType:
    module = types.ModuleType(FACTORY_MODULE)
    module.__file__ = filename
    exec(compile(source, filename, "exec"), module.__dict__)  # the owner's own code
    return module


def _factory(text: str) -> Source:
    file, function = text.rsplit(":", 1)
    path = Path(file)
    if not path.is_file():
        raise UsageError(f"no such model factory file {file}",
                         hint="SRC is FILE.py:FUNCTION returning (module, inputs)")  # fmt: skip
    source = path.read_text()
    try:
        module = _load_factory_module(source, str(path))
        made = getattr(module, function)()
    except AttributeError:
        raise UsageError(f"{file} has no function {function!r}") from None
    except Exception as exc:  # the owner's code: any failure is reported in one line
        raise UsageError(f"{text} failed: {type(exc).__name__}: {str(exc)[:200]}") from None
    if not isinstance(made, tuple) or len(made) != 2 or not isinstance(made[0], nn.Module):
        raise UsageError(f"{text} must return (torch.nn.Module, example input tuple)")
    model, inputs = made
    inputs = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    if not all(isinstance(t, torch.Tensor) for t in inputs):
        raise UsageError(f"{text}: the example input must be a tensor or a tuple of tensors")
    spec = ModelSpec("factory", {}, f"{path.name}:{function}", factory_source=source,
                     factory_function=function, fixed_inputs=inputs)  # fmt: skip
    return Source(model.eval(), spec)


def build_skeleton(spec: ModelSpec) -> nn.Module:
    """The module with the spec's architecture; its weights are placeholders (meta tensors where
    possible), to be replaced by the bundle's. A factory's code runs here (it is the owner's,
    authenticated with the bundle)."""
    if spec.kind == "factory":
        assert spec.factory_source is not None and spec.factory_function is not None
        module = _load_factory_module(spec.factory_source, spec.name.split(":")[0])
        return getattr(module, spec.factory_function)()[0].eval()
    if spec.kind == "builtin":
        return load_model(spec.name, MODEL_SEED)[0].eval()
    with torch.device("meta"), _no_init():
        return _make(spec).eval()


_INIT_FUNCTIONS = ("normal_", "uniform_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_",
                   "xavier_uniform_", "xavier_normal_", "orthogonal_")  # fmt: skip


@contextlib.contextmanager
def _no_init() -> Iterator[None]:
    """Modules built inside skip their random initialisation (the bundle's values replace every
    parameter). On meta tensors torch still runs the initialisers through its Python reference
    implementations: seconds per model on a host, tens of seconds in an emulated guest."""
    saved = {name: getattr(nn.init, name) for name in _INIT_FUNCTIONS}

    def skip(tensor: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        return tensor

    try:
        for name in _INIT_FUNCTIONS:
            setattr(nn.init, name, skip)
        yield
    finally:
        for name, function in saved.items():
            setattr(nn.init, name, function)


def _make(spec: ModelSpec) -> nn.Module:
    if spec.kind == "bert":
        return BertEncoder(_bert_config(spec.config))
    if spec.kind == "sentence-bert":
        return SentenceEncoder(BertEncoder(_bert_config(spec.config)))
    if spec.kind == "seed-transformer":
        return SeedTransformer(SeedConfig(**spec.config))
    if spec.kind == "resnet18":
        return ResNet18(**spec.config)
    raise UsageError(f"unknown model kind {spec.kind!r} in the package")


def example_inputs(spec: ModelSpec, batch: int, seq: int) -> tuple[torch.Tensor, ...]:
    """The benchmark's inputs for this model (the same at protect time and in the master)."""
    if spec.fixed_inputs is not None:
        return spec.fixed_inputs
    if spec.kind == "sentence-bert":
        assert spec.tokenizer is not None
        tokenizer = Tokenizer.from_str(spec.tokenizer)
        tokenizer.enable_truncation(max_length=seq)
        tokenizer.enable_padding(length=seq, pad_id=0, pad_token="[PAD]")
        encodings = tokenizer.encode_batch(example_sentences(batch))
        ids = torch.tensor([e.ids for e in encodings], dtype=torch.long)
        mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.long)
        return ids, mask
    if spec.kind == "bert":
        generator = torch.Generator().manual_seed(MODEL_SEED)
        return random_token_inputs(int(spec.config["vocab_size"]), batch, seq, generator)

    name = {"seed-transformer": "seed-transformer", "resnet18": "resnet18"}.get(
        spec.kind, spec.name
    )
    overrides: dict[str, Any] = {}
    if spec.kind == "seed-transformer":
        overrides = {"vocab_size": spec.config["vocab_size"]}
    fn: Callable[[int, int], tuple[torch.Tensor, ...]] = _example_fn(name, overrides)
    return tuple(fn(batch, seq))


def _example_fn(name: str, overrides: dict[str, Any]) -> Callable[[int, int], tuple]:
    """The built-in example inputs without building the model's weights."""
    if name == "seed-transformer":
        vocab = int(overrides["vocab_size"])

        def seed_inputs(batch: int, seq: int) -> tuple[torch.Tensor, ...]:
            generator = torch.Generator().manual_seed(MODEL_SEED)
            src = torch.randint(0, vocab, (batch, seq), generator=generator)
            tgt = torch.randint(0, vocab, (batch, seq), generator=generator)
            return src, tgt

        return seed_inputs
    if name == "resnet18":

        def images(batch: int, seq: int) -> tuple[torch.Tensor, ...]:
            generator = torch.Generator().manual_seed(MODEL_SEED)
            return (torch.randn(batch, 3, seq, seq, generator=generator),)

        return images

    return load_model(name, MODEL_SEED)[1]


def spec_to_json(spec: ModelSpec) -> dict[str, Any]:
    return {"kind": spec.kind, "config": spec.config, "name": spec.name,
            "tokenizer": spec.tokenizer, "factory_source": spec.factory_source,
            "factory_function": spec.factory_function,
            "fixed_inputs": None if spec.fixed_inputs is None
            else len(spec.fixed_inputs)}  # fmt: skip


def spec_from_json(data: dict[str, Any], tensors: dict[str, torch.Tensor]) -> ModelSpec:
    count = data.get("fixed_inputs")
    fixed = None if count is None else tuple(tensors[f"inputs/{i}"] for i in range(int(count)))
    return ModelSpec(data["kind"], data.get("config") or {}, data.get("name", ""),
                     data.get("tokenizer"), data.get("factory_source"),
                     data.get("factory_function"), fixed)  # fmt: skip
