"""The seed's encoder-decoder transformer (random weights), with its FFN as 1x1 `nn.Conv1d`.

d_model 768, 12 encoder and 12 decoder layers, 12 heads, d_ff 3072, post-LayerNorm, ReLU.
Offloaded per encoder layer: fused QKV, attention output, FFN1, FFN2 (4 calls); per decoder
layer: fused self-attention QKV, its output, cross-attention Q, fused cross-attention KV (from the
encoder's output), its output, FFN1, FFN2 (7 calls).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from groupcover.models.bert import SelfAttention


@dataclass(frozen=True)
class SeedConfig:
    vocab_size: int = 1000
    d_model: int = 768
    encoder_layers: int = 12
    decoder_layers: int = 12
    heads: int = 12
    d_ff: int = 3072
    max_positions: int = 512


class ConvFeedForward(nn.Module):
    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(d_model, d_ff, kernel_size=1)
        self.conv2 = nn.Conv1d(d_ff, d_model, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = F.relu(self.conv1(x.transpose(1, 2)))
        return self.conv2(hidden).transpose(1, 2)


class CrossAttention(nn.Module):
    def __init__(self, d_model: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(d_model, d_model)
        self.kv = nn.Linear(d_model, 2 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        batch, length, d_model = x.shape
        head_dim = d_model // self.heads
        q = self.q(x).view(batch, length, self.heads, head_dim).transpose(1, 2)
        kv = self.kv(memory).view(batch, memory.shape[1], 2, self.heads, head_dim)
        k, v = kv.permute(2, 0, 3, 1, 4)
        context = F.scaled_dot_product_attention(q, k, v)
        return self.out(context.transpose(1, 2).reshape(batch, length, d_model))


class EncoderLayer(nn.Module):
    def __init__(self, config: SeedConfig) -> None:
        super().__init__()
        self.self_attn = SelfAttention(config.d_model, config.heads)
        self.norm1 = nn.LayerNorm(config.d_model)
        self.ffn = ConvFeedForward(config.d_model, config.d_ff)
        self.norm2 = nn.LayerNorm(config.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + self.self_attn(x))
        return self.norm2(x + self.ffn(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: SeedConfig) -> None:
        super().__init__()
        self.self_attn = SelfAttention(config.d_model, config.heads)
        self.norm1 = nn.LayerNorm(config.d_model)
        self.cross_attn = CrossAttention(config.d_model, config.heads)
        self.norm2 = nn.LayerNorm(config.d_model)
        self.ffn = ConvFeedForward(config.d_model, config.d_ff)
        self.norm3 = nn.LayerNorm(config.d_model)

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + self.self_attn(x, causal=True))
        x = self.norm2(x + self.cross_attn(x, memory))
        return self.norm3(x + self.ffn(x))


class SeedTransformer(nn.Module):
    """forward(src_ids (N, S), tgt_ids (N, T)) -> decoder states (N, T, d_model)."""

    def __init__(self, config: SeedConfig) -> None:
        super().__init__()
        self.config = config
        self.src_embed = nn.Embedding(config.vocab_size, config.d_model)
        self.tgt_embed = nn.Embedding(config.vocab_size, config.d_model)
        self.position = nn.Embedding(config.max_positions, config.d_model)
        self.encoder = nn.ModuleList(EncoderLayer(config) for _ in range(config.encoder_layers))
        self.decoder = nn.ModuleList(DecoderLayer(config) for _ in range(config.decoder_layers))

    def _embed(self, embedding: nn.Embedding, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        return embedding(ids) + self.position(positions)

    def forward(self, src_ids: torch.Tensor, tgt_ids: torch.Tensor) -> torch.Tensor:
        memory = self._embed(self.src_embed, src_ids)
        for layer in self.encoder:
            memory = layer(memory)
        x = self._embed(self.tgt_embed, tgt_ids)
        for decoder_layer in self.decoder:
            x = decoder_layer(x, memory)
        return x
