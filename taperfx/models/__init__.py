"""The models taperfx trains and exports: reference decoders with an explicit KV cache (``llama`` with RMSNorm,
``gpt2`` with LayerNorm), ``transformers`` causal LMs behind the same calling convention, and the ``ModelSource``
protocol that both kinds of source (``ModelConfig``, ``HFSource``) implement."""

from taperfx.models.config import PRESETS, ModelConfig, preset
from taperfx.models.decoder import Cache, Decoder
from taperfx.models.generate import generate, sample_next, stream
from taperfx.models.gpt2 import GPT2
from taperfx.models.hf_causal_lm import HFCausalLM, unwrap
from taperfx.models.hf_source import HFSource
from taperfx.models.llama import Llama
from taperfx.models.source import ModelSource, source_from_dict

__all__ = [
    "ModelConfig",
    "PRESETS",
    "preset",
    "Decoder",
    "Cache",
    "Llama",
    "GPT2",
    "build_model",
    "ModelSource",
    "source_from_dict",
    "HFSource",
    "HFCausalLM",
    "unwrap",
    "generate",
    "sample_next",
    "stream",
]


def build_model(config: ModelConfig) -> Decoder:
    """A freshly initialised reference model for ``config`` (plain norms; see taperfx.convert)."""
    return config.build()
