"""``ModelSource``: what a training run builds, and what its checkpoints record to build it again.

Two kinds exist: ``ModelConfig`` (a reference decoder, freshly initialised) and
``HFSource`` (a local ``transformers`` checkpoint, fine-tuned from its weights).
The trainer, the checkpoint loader and the evaluators speak only this protocol,
so none of them branches on the kind; ``source_from_dict`` is the one place that
tells the two records apart.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import nn

from taperfx.models.config import ModelConfig
from taperfx.models.hf_source import HFSource

__all__ = ["ModelSource", "source_from_dict"]


@runtime_checkable
class ModelSource(Protocol):
    """A model to build, its context length, and a JSON record that rebuilds it."""

    @property
    def vocab_size(self) -> int:
        """Rows of the embedding: the largest token id the data may hold, plus one."""

    @property
    def max_seq_len(self) -> int:
        """The longest context the model was built for."""

    def build(self) -> nn.Module:
        """The model a training run starts from, in taperfx's decoder calling convention."""

    def build_architecture(self) -> nn.Module:
        """The same architecture with fresh weights and no file read, for a checkpoint's weights to load into."""

    def to_dict(self) -> dict:
        """A JSON-serialisable record; ``source_from_dict`` turns it back into an equal source."""


def source_from_dict(record: dict) -> ModelSource:
    """The source a checkpoint recorded with ``ModelSource.to_dict`` (either kind)."""
    if not isinstance(record, dict):
        raise ValueError(f"a model record must be a JSON object, got {type(record).__name__}")
    return HFSource.from_dict(record) if HFSource.recorded_in(record) else ModelConfig.from_dict(record)
