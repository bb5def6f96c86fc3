"""Causal self-attention over an explicit KV cache.

The cache is a tensor pair per layer that goes in and comes out (``present =
cat(past, new)``), never a buffer mutated in place: torch.export and the ONNX
exporter then see it as a real input/output (``past_key_values.N.key`` →
``present.N.key``), instead of freezing it into a constant.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

KV = tuple[torch.Tensor, torch.Tensor]


def causal_mask(positions: torch.Tensor, key_len: int) -> torch.Tensor:
    """Boolean (B, 1, T, S) mask: query at position p sees keys 0..p of the sequence."""
    keys = torch.arange(key_len, device=positions.device)
    return (keys <= positions[..., None]).unsqueeze(1)


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past: KV | None, mask: torch.Tensor
) -> tuple[torch.Tensor, KV]:
    """q, k, v: (B, H, T, Dh). Returns the attention output (B, T, H·Dh) and the new cache."""
    if past is None:
        # The cache leaves in one layout whatever its history (here k, v are transposed
        # views): a compiled step then sees the same strides at every call.
        k, v = k.contiguous(), v.contiguous()
    else:
        k = torch.cat([past[0], k], dim=2)
        v = torch.cat([past[1], v], dim=2)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    b, h, t, dh = out.shape
    return out.transpose(1, 2).reshape(b, t, h * dh), (k, v)


def split_heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """(B, T, H·Dh) → (B, H, T, Dh)."""
    b, t, _ = x.shape
    return x.view(b, t, n_heads, -1).transpose(1, 2)
