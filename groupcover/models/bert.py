"""A BERT encoder in plain torch (post-LayerNorm, GELU), with Q, K and V fused in one Linear.

The fused `qkv` projection is what the master offloads as one call; the attention products,
softmax, masking, LayerNorm, GELU, residuals and embeddings run wherever the module runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int = 30522
    hidden: int = 768
    layers: int = 12
    heads: int = 12
    intermediate: int = 3072
    max_positions: int = 512
    type_vocab: int = 2
    eps: float = 1e-12


def additive_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(N, L) 1/0 mask -> (N, 1, 1, L) additive mask for scaled_dot_product_attention."""
    blocked = (attention_mask == 0).to(dtype) * torch.finfo(dtype).min
    return blocked[:, None, None, :]


class SelfAttention(nn.Module):
    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.out = nn.Linear(hidden, hidden)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, causal: bool = False
    ) -> torch.Tensor:
        batch, length, hidden = x.shape
        qkv = self.qkv(x).view(batch, length, 3, self.heads, hidden // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        context = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        return self.out(context.transpose(1, 2).reshape(batch, length, hidden))


class BertLayer(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.attention = SelfAttention(config.hidden, config.heads)
        self.attention_norm = nn.LayerNorm(config.hidden, eps=config.eps)
        self.ffn1 = nn.Linear(config.hidden, config.intermediate)
        self.ffn2 = nn.Linear(config.intermediate, config.hidden)
        self.norm = nn.LayerNorm(config.hidden, eps=config.eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.attention_norm(x + self.attention(x, mask))
        return self.norm(x + self.ffn2(F.gelu(self.ffn1(x))))


class BertEmbeddings(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden)
        self.position_embeddings = nn.Embedding(config.max_positions, config.hidden)
        self.token_type_embeddings = nn.Embedding(config.type_vocab, config.hidden)
        self.norm = nn.LayerNorm(config.hidden, eps=config.eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)
        x = x + self.token_type_embeddings.weight[0]
        return self.norm(x)


class BertEncoder(nn.Module):
    """forward(input_ids (N, L), attention_mask (N, L)) -> last hidden states (N, L, hidden)."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(config.layers))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(input_ids)
        mask = additive_mask(attention_mask, x.dtype)
        for layer in self.layer:
            x = layer(x, mask)
        return x


def random_token_inputs(
    vocab_size: int, batch: int, seq: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids and a mask where every odd sample has its last quarter padded."""
    input_ids = torch.randint(1000 % vocab_size, vocab_size, (batch, seq), generator=generator)
    attention_mask = torch.ones(batch, seq, dtype=torch.long)
    attention_mask[1::2, seq - seq // 4 :] = 0
    input_ids[attention_mask == 0] = 0
    return input_ids, attention_mask
