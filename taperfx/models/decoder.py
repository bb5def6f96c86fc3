"""The decoder skeleton both reference models share: embed, blocks with a KV cache, norm, head."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

from taperfx.models.attention import KV, causal_mask

if TYPE_CHECKING:  # config.py imports the decoders to build them
    from taperfx.models.config import ModelConfig

Cache = list[KV]


class Decoder(nn.Module):
    """``forward(input_ids, positions=None, past_key_values=None) -> (logits, present)``.

    ``past_key_values`` is ``None`` (prefill from scratch) or one ``(key, value)``
    pair of shape (B, H, P, Dh) per layer; ``present`` is the same with ``P + T``
    positions. ``positions`` (B, T) default to ``P, P+1, …``. Subclasses provide
    ``embed``, ``position_context``, ``layers``, ``norm`` and ``output``.
    """

    config: ModelConfig
    residual_projections: tuple[str, ...]  # parameter-name suffixes that get the scaled init
    layers: nn.ModuleList
    norm: nn.Module
    output: nn.Linear

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
    ) -> tuple[torch.Tensor, Cache]:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
        b, t = input_ids.shape
        if past_key_values is not None and len(past_key_values) != len(self.layers):
            raise ValueError(f"past_key_values has {len(past_key_values)} layers, the model {len(self.layers)}")
        past_len = 0 if past_key_values is None else past_key_values[0][0].shape[2]
        if not torch.compiler.is_compiling() and past_len + t > self.config.max_seq_len:
            raise ValueError(
                f"sequence of {past_len + t} tokens exceeds the model's context of {self.config.max_seq_len}"
            )
        if positions is None:
            positions = (torch.arange(t, device=input_ids.device) + past_len).expand(b, t)
        mask = causal_mask(positions, past_len + t)
        ctx = self.position_context(positions)
        h = self.embed(input_ids, positions)
        present: Cache = []
        for i, layer in enumerate(self.layers):
            h, kv = layer(h, ctx, mask, None if past_key_values is None else past_key_values[i])
            present.append(kv)
        return self.output(self.norm(h)), present

    def position_context(self, positions: torch.Tensor):
        return None

    def init_weights(self) -> None:
        """GPT-2 style: N(0, 0.02), residual output projections scaled by 1/sqrt(2·layers)."""
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layers)
        for name, p in self.named_parameters():
            if p.dim() < 2:
                continue
            std = residual_std if name.endswith(self.residual_projections) else 0.02
            nn.init.normal_(p, mean=0.0, std=std)
        for m in self.modules():
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def empty_cache(self, batch: int, device=None, dtype=None) -> Cache:
        """A zero-length cache, for callers (ONNX export) that always pass one."""
        c = self.config
        shape = (batch, c.n_heads, 0, c.head_dim)
        p = next(self.parameters())
        z = torch.zeros(shape, device=device or p.device, dtype=dtype or p.dtype)
        return [(z, z) for _ in range(c.n_layers)]
