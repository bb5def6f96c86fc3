"""A ``transformers`` causal LM behind taperfx's decoder calling convention.

The trainer, ``taperfx.models.generate`` and the exporters speak
``model(input_ids, positions, past_key_values) -> (logits, present)`` with the
cache an explicit list of ``(key, value)`` tensors; ``transformers`` speaks
``ModelOutput`` and ``Cache`` objects. ``HFCausalLM`` translates between the two
and nothing else, so every TaperNorm, ``convert`` and ``fold_module`` see the
Hugging Face modules themselves (under the ``hf.`` prefix).
"""

from __future__ import annotations

import torch
from torch import nn

from taperfx.models.hf_extra import transformers

__all__ = ["HFCausalLM", "unwrap"]


class HFCausalLM(nn.Module):
    """Wraps a ``transformers`` ``*ForCausalLM`` model; ``self.hf`` is that model."""

    def __init__(self, hf_model: nn.Module) -> None:
        super().__init__()
        if not callable(getattr(hf_model, "get_output_embeddings", None)):
            raise TypeError(f"expected a transformers causal LM (a *ForCausalLM model), got {type(hf_model).__name__}")
        self.hf = hf_model

    @property
    def output(self) -> nn.Module:
        """The output projection, under the name the reference decoders give it (metrics group it as an embedding)."""
        return self.hf.get_output_embeddings()

    @property
    def max_seq_len(self) -> int:
        """The longest context the model was built for (GPT-2 ``n_positions``, Llama ``max_position_embeddings``)."""
        return int(self.hf.config.max_position_embeddings)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        past_key_values: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        cache = transformers().DynamicCache(config=self.hf.config)
        for layer, (key, value) in enumerate(past_key_values or ()):
            cache.update(key, value, layer)
        out = self.hf(input_ids=input_ids, position_ids=positions, past_key_values=cache, use_cache=True)
        return out.logits, [(layer.keys, layer.values) for layer in out.past_key_values.layers]


def unwrap(model: nn.Module) -> nn.Module:
    """The ``transformers`` model inside an ``HFCausalLM`` (or ``model`` itself)."""
    return model.hf if isinstance(model, HFCausalLM) else model
