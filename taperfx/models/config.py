"""Model configuration shared by the reference decoders, and the paper's presets.

``ModelConfig`` is the reference decoders' ``ModelSource`` (taperfx/models/source.py):
it builds a freshly initialised ``Llama`` or ``GPT2`` and records itself as JSON.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from taperfx._config import DictConfig
from taperfx.errors import BadInput
from taperfx.models.gpt2 import GPT2
from taperfx.models.llama import Llama

__all__ = ["ModelConfig", "PRESETS", "preset"]

_DECODERS = {"llama": Llama, "gpt2": GPT2}
ARCHS = tuple(_DECODERS)


@dataclass(frozen=True)
class ModelConfig(DictConfig):
    """Everything needed to rebuild a reference model; round-trips through JSON."""

    config_kind: ClassVar[str] = "model config"

    arch: str = "llama"
    vocab_size: int = 32000
    dim: int = 512
    n_layers: int = 8
    n_heads: int = 16
    max_seq_len: int = 512
    hidden_dim: int | None = None  # MLP width; default 8/3·dim (SwiGLU) or 4·dim (GELU), rounded to 8
    norm_eps: float = 1e-5
    rope_base: float = 10000.0
    tie_embeddings: bool = True

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise BadInput(f"arch must be one of {ARCHS}, got {self.arch!r}")
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise BadInput(f"{name} must be positive, got {getattr(self, name)}")
        if self.dim % self.n_heads:
            raise BadInput(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        if self.arch == "llama" and self.head_dim % 2:
            raise BadInput(f"RoPE needs an even head_dim, got {self.head_dim}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def mlp_dim(self) -> int:
        if self.hidden_dim is not None:
            return self.hidden_dim
        width = 8 * self.dim // 3 if self.arch == "llama" else 4 * self.dim
        return -(-width // 8) * 8

    def build(self) -> nn.Module:
        """A freshly initialised reference decoder (plain norms; see taperfx.convert), drawn from torch's RNG."""
        return _DECODERS[self.arch](self)

    def build_architecture(self) -> nn.Module:
        """The decoder a checkpoint's weights load into: a reference model's weights are all in the checkpoint."""
        return self.build()

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


# The paper's TinyStories models (docs/method.md §9): depth 8, 16 heads, width 64/128/256/512.
PRESETS: dict[str, ModelConfig] = {
    f"tinystories-{w}": ModelConfig(arch="llama", dim=w, n_layers=8, n_heads=16) for w in (64, 128, 256, 512)
}
PRESETS["gpt2-small"] = ModelConfig(arch="gpt2", vocab_size=50257, dim=768, n_layers=12, n_heads=12, max_seq_len=1024)


def preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise BadInput(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides)
