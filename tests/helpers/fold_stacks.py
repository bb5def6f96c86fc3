"""Randomly shaped pre-norm decoder stacks for the fold tests (not a test module itself)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import taperfx


class Block(nn.Module):
    def __init__(self, width: int, *, ln: bool, fused_qkv: bool, swiglu: bool, bias: bool) -> None:
        super().__init__()
        norm = (lambda: nn.LayerNorm(width, bias=bias)) if ln else (lambda: nn.RMSNorm(width))
        self.norm1, self.norm2 = norm(), norm()
        if fused_qkv:
            self.qkv = nn.Linear(width, 3 * width, bias=bias)
        else:
            self.q, self.k, self.v = (nn.Linear(width, width, bias=bias) for _ in range(3))
        self.proj = nn.Linear(width, width, bias=bias)
        hidden = 2 * width + 3
        self.up = nn.Linear(width, hidden, bias=bias)
        self.gate = nn.Linear(width, hidden, bias=bias) if swiglu else None
        self.down = nn.Linear(hidden, width, bias=bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        a = self.norm1(h)
        q, k, v = self.qkv(a).chunk(3, dim=-1) if hasattr(self, "qkv") else (self.q(a), self.k(a), self.v(a))
        h = h + self.proj(F.scaled_dot_product_attention(q, k, v, is_causal=True))
        m = self.norm2(h)
        inner = F.silu(self.gate(m)) * self.up(m) if self.gate is not None else F.gelu(self.up(m))
        return h + self.down(inner)


class Stack(nn.Module):
    def __init__(self, *, vocab: int, width: int, layers: int, tied: bool, ln: bool, **block) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.blocks = nn.ModuleList(Block(width, ln=ln, **block) for _ in range(layers))
        self.norm = nn.LayerNorm(width) if ln else nn.RMSNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        if tied:
            self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h))


def randomize_gains(model: nn.Module, generator: torch.Generator) -> None:
    """Non-trivial γ, β (fresh norms start at 1 and 0, which would hide a wrong fold)."""
    with torch.no_grad():
        for m in model.modules():
            for name in ("weight", "bias"):
                p = getattr(m, name, None)
                if isinstance(m, (nn.LayerNorm, nn.RMSNorm)) and p is not None:
                    p.copy_(torch.randn(p.shape, generator=generator) * 0.5 + (1.0 if name == "weight" else 0.0))


def gate_zero(model: nn.Module, mode: str, ids: torch.Tensor, generator: torch.Generator) -> nn.Module:
    """convert → calibrate on ``ids`` → start_taper → perturb γ̃ → g = 0, in eval mode."""
    randomize_gains(model, generator)
    taperfx.convert(model, mode)
    taperfx.calibrate(model, [ids])
    with torch.no_grad():
        for norm in taperfx.tapernorms(model):
            norm.weight_tilde.mul_(1 + 0.3 * torch.randn(norm.weight_tilde.shape, generator=generator))
    taperfx.set_gate(model, 0.0)
    return model.eval()


def taper_layer_names(model: nn.Module) -> set[str]:
    return {name for name, m in model.named_modules() if isinstance(m, taperfx.TaperNorm)}


def computing_layers(program) -> set[str]:
    """Module paths that still own a computing node in the program's graph."""
    out = set()
    for node in program.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if node.op == "call_function" and stack:
            out.add(list(stack.values())[-1][0])
    return out
