"""Hugging Face ``transformers`` checkpoints through taperfx: convert, fine-tune, fold, save back.

Importable without ``transformers`` (the optional extra ``hf``); the functions
that need it import it when called and say how to install it when it is missing.
"""

from taperfx.hf.causal_lm import HFCausalLM, unwrap
from taperfx.hf.data import prepare_text
from taperfx.hf.folded import IDENTITY_NORMS_KEY, load_folded, save_folded
from taperfx.hf.presets import GPT2_FINETUNE, FinetunePreset, finetune_preset
from taperfx.hf.source import HFSource, model_from_meta

__all__ = [
    "HFCausalLM",
    "unwrap",
    "HFSource",
    "model_from_meta",
    "prepare_text",
    "save_folded",
    "load_folded",
    "IDENTITY_NORMS_KEY",
    "FinetunePreset",
    "GPT2_FINETUNE",
    "finetune_preset",
]
