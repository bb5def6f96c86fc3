"""Llama-style reference decoder: pre-norm RMSNorm, RoPE, SwiGLU, no biases, tied embeddings.

The paper's TinyStories model (docs/method.md §9). Parameter names follow gpt-fast / Meta
(``attention.wq``, ``feed_forward.w1``…), so each norm feeds separate q/k/v
(or gate/up) linears: the shape ``taperfx.fold`` has to handle.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from taperfx.models.attention import KV, attend, split_heads
from taperfx.models.decoder import Decoder

if TYPE_CHECKING:  # config.py imports the decoders to build them
    from taperfx.models.config import ModelConfig

__all__ = ["Llama"]


def rope_tables(config: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    half = config.head_dim // 2
    inv_freq = 1.0 / (config.rope_base ** (torch.arange(half, dtype=torch.float64) / half))
    angles = torch.outer(torch.arange(config.max_seq_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate halves of each head (x: B, H, T, Dh; cos/sin: B, 1, T, Dh/2)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).type_as(x)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.wq = nn.Linear(config.dim, config.dim, bias=False)
        self.wk = nn.Linear(config.dim, config.dim, bias=False)
        self.wv = nn.Linear(config.dim, config.dim, bias=False)
        self.wo = nn.Linear(config.dim, config.dim, bias=False)

    def forward(self, x, rope, mask, past: KV | None):
        cos, sin = rope
        q = apply_rope(split_heads(self.wq(x), self.n_heads), cos, sin)
        k = apply_rope(split_heads(self.wk(x), self.n_heads), cos, sin)
        v = split_heads(self.wv(x), self.n_heads)
        out, kv = attend(q, k, v, past, mask)
        return self.wo(out), kv


class FeedForward(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(config.dim, config.mlp_dim, bias=False)
        self.w3 = nn.Linear(config.dim, config.mlp_dim, bias=False)
        self.w2 = nn.Linear(config.mlp_dim, config.dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.attention_norm = nn.RMSNorm(config.dim, eps=config.norm_eps)
        self.attention = Attention(config)
        self.ffn_norm = nn.RMSNorm(config.dim, eps=config.norm_eps)
        self.feed_forward = FeedForward(config)

    def forward(self, x, rope, mask, past: KV | None):
        a, kv = self.attention(self.attention_norm(x), rope, mask, past)
        x = x + a
        return x + self.feed_forward(self.ffn_norm(x)), kv


class Llama(Decoder):
    residual_projections = ("attention.wo.weight", "feed_forward.w2.weight")

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if config.arch != "llama":
            raise ValueError(f"Llama needs arch='llama', got {config.arch!r}")
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = nn.RMSNorm(config.dim, eps=config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        cos, sin = rope_tables(config)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.init_weights()
        if config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def embed(self, input_ids, positions):
        return self.tok_embeddings(input_ids)

    def position_context(self, positions):
        return self.rope_cos[positions].unsqueeze(1), self.rope_sin[positions].unsqueeze(1)
