"""GPT-2-style reference decoder: pre-norm LayerNorm with bias, learned positions, GELU MLP, fused qkv.

The LN variant of the method (TaperLN, docs/method.md §3) and a fused ``c_attn`` projection
whose rows are q, k and v: the other shape ``taperfx.fold`` has to handle.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch.nn.functional as F
from torch import nn

from taperfx.models.attention import KV, attend, split_heads
from taperfx.models.decoder import Decoder

if TYPE_CHECKING:  # config.py imports the decoders to build them
    from taperfx.models.config import ModelConfig

__all__ = ["GPT2"]


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.c_attn = nn.Linear(config.dim, 3 * config.dim)
        self.c_proj = nn.Linear(config.dim, config.dim)

    def forward(self, x, ctx, mask, past: KV | None):
        q, k, v = (split_heads(t, self.n_heads) for t in self.c_attn(x).chunk(3, dim=-1))
        out, kv = attend(q, k, v, past, mask)
        return self.c_proj(out), kv


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.dim, config.mlp_dim)
        self.c_proj = nn.Linear(config.mlp_dim, config.dim)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.dim, eps=config.norm_eps)
        self.attn = Attention(config)
        self.ln_2 = nn.LayerNorm(config.dim, eps=config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, ctx, mask, past: KV | None):
        a, kv = self.attn(self.ln_1(x), ctx, mask, past)
        x = x + a
        return x + self.mlp(self.ln_2(x)), kv


class GPT2(Decoder):
    residual_projections = ("attn.c_proj.weight", "mlp.c_proj.weight")

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if config.arch != "gpt2":
            raise ValueError(f"GPT2 needs arch='gpt2', got {config.arch!r}")
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.dim)
        self.wpe = nn.Embedding(config.max_seq_len, config.dim)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = nn.LayerNorm(config.dim, eps=config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.init_weights()
        if config.tie_embeddings:
            self.output.weight = self.wte.weight

    def embed(self, input_ids, positions):
        return self.wte(input_ids) + self.wpe(positions)
