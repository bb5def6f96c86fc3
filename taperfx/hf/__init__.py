"""Hugging Face ``transformers`` checkpoints through taperfx: convert, fine-tune, fold, save back.

Importable without ``transformers`` (the optional extra ``hf``); the functions
that need it import it when called and say how to install it when it is missing.
The model adapter and the ``--init-from`` source (``HFCausalLM``, ``HFSource``) live
in ``taperfx.models``, below training, and are re-exported here; this package sits
above training (it writes the trainer's data layout and folds what it trained).
"""

from taperfx.hf.data import prepare_text
from taperfx.hf.folded import IDENTITY_NORMS_KEY, load_folded, save_folded
from taperfx.hf.presets import GPT2_FINETUNE, FinetunePreset, finetune_preset
from taperfx.models import HFCausalLM, HFSource, unwrap

__all__ = [
    "HFCausalLM",
    "unwrap",
    "HFSource",
    "prepare_text",
    "save_folded",
    "load_folded",
    "IDENTITY_NORMS_KEY",
    "FinetunePreset",
    "GPT2_FINETUNE",
    "finetune_preset",
]
