"""Reference decoders with an explicit KV cache: ``llama`` (RMSNorm) and ``gpt2`` (LayerNorm)."""

from taperfx.models.config import PRESETS, ModelConfig, preset
from taperfx.models.decoder import Cache, Decoder
from taperfx.models.generate import generate, sample_next, stream
from taperfx.models.gpt2 import GPT2
from taperfx.models.llama import Llama

__all__ = [
    "ModelConfig",
    "PRESETS",
    "preset",
    "Decoder",
    "Cache",
    "Llama",
    "GPT2",
    "build_model",
    "generate",
    "sample_next",
    "stream",
]


def build_model(config: ModelConfig) -> Decoder:
    """A freshly initialised reference model for ``config`` (plain norms; see taperfx.convert)."""
    return {"llama": Llama, "gpt2": GPT2}[config.arch](config)
