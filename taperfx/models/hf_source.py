"""``--init-from hf:PATH``: a local transformers checkpoint as the starting point of a run.

``HFSource`` is the ``ModelSource`` (taperfx/models/source.py) of a Hugging Face
model, as ``ModelConfig`` is the reference decoders' one: the trainer asks it for
the context length and the model (``build``: the pretrained weights), a checkpoint
records ``to_dict()``, and loading that checkpoint rebuilds the architecture from
the record alone (``build_architecture``: no file of the source directory is read,
so a checkpoint outlives the directory it was fine-tuned from).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from taperfx.errors import BadInput, DataError, InputNotFound
from taperfx.jsonfile import read_json_object
from taperfx.models.hf_causal_lm import HFCausalLM
from taperfx.models.hf_extra import transformers

__all__ = ["HF_SCHEME", "HFSource"]

HF_SCHEME = "hf:"
_CONFIG_KEY = "hf_config"
_PATH_KEY = "hf_path"


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
        config = read_json_object(config_file)
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

    def build_architecture(self) -> HFCausalLM:
        """A freshly initialised model of this architecture (float32), for a checkpoint's own weights."""
        config = _config_from_dict(self.config)
        return HFCausalLM(transformers().AutoModelForCausalLM.from_config(config, dtype=torch.float32))

    def to_dict(self) -> dict:
        return {_CONFIG_KEY: self.config, _PATH_KEY: str(self.path)}

    @classmethod
    def from_dict(cls, record: dict) -> "HFSource":
        """The source ``to_dict`` recorded; its directory need not exist any more."""
        missing = {_CONFIG_KEY, _PATH_KEY} - set(record)
        if missing:
            raise DataError(f"a Hugging Face model record lacks {sorted(missing)}")
        config = record[_CONFIG_KEY]
        if not isinstance(config, dict) or "model_type" not in config:
            raise DataError("a Hugging Face model record holds no transformers config (no model_type)")
        return cls(Path(record[_PATH_KEY]), config)

    @staticmethod
    def recorded_in(record: dict) -> bool:
        """Whether ``record`` (a checkpoint's ``model`` entry) was written by ``HFSource.to_dict``."""
        return _CONFIG_KEY in record


def _config_from_dict(config: dict):
    fields = dict(config)
    return transformers().AutoConfig.for_model(fields.pop("model_type"), **fields)
