"""``--init-from hf:PATH``: a local transformers checkpoint as the starting point of a run.

``HFSource`` stands where ``ModelConfig`` stands for the reference models: the
trainer asks it for the context length, for the model (``build``, pretrained
weights) and for what to record in a taperfx checkpoint (``to_dict``);
``model_from_meta`` rebuilds the architecture from that record when the
checkpoint is loaded again, before its own weights are put in.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from taperfx.errors import BadInput, InputNotFound
from taperfx.hf._extra import transformers
from taperfx.hf.causal_lm import HFCausalLM

__all__ = ["HF_SCHEME", "HFSource", "model_from_meta"]

HF_SCHEME = "hf:"
_META_KEY = "hf_config"


@dataclass(frozen=True)
class HFSource:
    path: Path
    config: dict  # the checkpoint's config.json as transformers writes it

    @classmethod
    def parse(cls, spec: str, vocab_size: int | None = None) -> "HFSource":
        """``hf:PATH`` → the source; ``vocab_size`` (the data's) must fit the model's embedding."""
        if not spec.startswith(HF_SCHEME):
            raise BadInput(f"init_from must look like 'hf:PATH' (a local transformers directory), got {spec!r}")
        path = Path(spec.removeprefix(HF_SCHEME)).expanduser()
        return cls.from_directory(path, vocab_size)

    @classmethod
    def from_directory(cls, path: str | os.PathLike, vocab_size: int | None = None) -> "HFSource":
        path = Path(path)
        config_file = path / "config.json"
        if not config_file.is_file():
            raise InputNotFound(f"{path} is not a transformers checkpoint directory (no config.json)")
        config = json.loads(config_file.read_text())
        if "model_type" not in config:
            raise BadInput(f"{config_file} has no model_type; it is not a transformers config")
        source = cls(path, config)
        if vocab_size is not None and vocab_size > source.vocab_size:
            raise BadInput(
                f"the data's tokenizer has {vocab_size} tokens but {path} embeds only {source.vocab_size}; "
                "tokenize the corpus with the checkpoint's own tokenizer (taperfx.hf.prepare_text)"
            )
        return source

    @property
    def vocab_size(self) -> int:
        return int(self.config["vocab_size"])

    @property
    def max_seq_len(self) -> int:
        """The longest context the model was built for (GPT-2 ``n_positions``, Llama ``max_position_embeddings``)."""
        return int(_config_from_dict(self.config).max_position_embeddings)

    def build(self) -> HFCausalLM:
        """The pretrained model in float32 (the trainer autocasts to bf16 on GPU), in training mode."""
        hf = transformers().AutoModelForCausalLM.from_pretrained(self.path, dtype=torch.float32)
        return HFCausalLM(hf).train()

    def to_dict(self) -> dict:
        return {_META_KEY: self.config, "hf_path": str(self.path)}


def model_from_meta(model_meta: dict) -> HFCausalLM:
    """A freshly initialised model of the architecture recorded by ``HFSource.to_dict``."""
    config = _config_from_dict(model_meta[_META_KEY])
    return HFCausalLM(transformers().AutoModelForCausalLM.from_config(config, dtype=torch.float32))


def _config_from_dict(config: dict):
    fields = dict(config)
    return transformers().AutoConfig.for_model(fields.pop("model_type"), **fields)
