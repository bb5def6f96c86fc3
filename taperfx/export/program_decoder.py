"""Decode with a saved decoder program (``.pt2``: folded, and quantized or not) through ``taperfx.models.stream``.

A program exported by ``taperfx.export.decoder_program`` takes the KV cache as an
explicit list of (key, value) pairs and cannot build an empty one itself, so
prefill needs a zero-length cache of the right heads, head size and dtype. They
are read off the program's own input placeholders.
"""

from __future__ import annotations

import torch
from torch.export import ExportedProgram

from taperfx.export.program import decoder_layers

__all__ = ["ProgramDecoder"]


class ProgramDecoder:
    """``step(input_ids, positions, past_key_values) -> (logits, present)`` over an ExportedProgram."""

    def __init__(self, program: ExportedProgram) -> None:
        decoder_layers(program)
        user_inputs = program.graph_signature.user_inputs
        placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
        kv = [placeholders[name].meta["val"] for name in user_inputs[2:]]
        self._shapes = [(t.shape[1], t.shape[3]) for t in kv]
        self._dtype = kv[0].dtype
        self.module = program.module()

    def empty_cache(self, batch: int, device: torch.device | str = "cpu") -> list[tuple[torch.Tensor, torch.Tensor]]:
        """A zero-length past for prefill."""
        pairs = zip(self._shapes[0::2], self._shapes[1::2])
        return [tuple(torch.zeros(batch, h, 0, d, dtype=self._dtype, device=device) for h, d in pair) for pair in pairs]

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, past_key_values=None):
        cache = self.empty_cache(input_ids.shape[0], input_ids.device) if past_key_values is None else past_key_values
        logits, present = self.module(input_ids, positions, list(cache))
        return logits, present
