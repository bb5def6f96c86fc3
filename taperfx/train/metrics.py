"""What a run logs: grad norms by weight type, and the append-only ``metrics.jsonl``.

Grad norms are grouped as in the paper's Fig. 4 (attention, MLP, embedding, norm
gains): the taper shows up as a change in how the gradient splits between them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from taperfx.convert import find_norms
from taperfx.train.atomic import write_text_atomic

__all__ = ["WEIGHT_TYPES", "weight_types", "grad_norms", "MetricsLog"]

WEIGHT_TYPES = ("attention", "mlp", "embedding", "norm")
_ATTENTION = ("attention", "attn", "self_attn")  # self_attn: Hugging Face Llama
_MLP = ("feed_forward", "mlp")


def weight_types(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Parameters of ``model`` grouped by weight type (each parameter once, tied ones included)."""
    norms = {id(m) for _, m in find_norms(model)}
    groups: dict[str, list[nn.Parameter]] = {t: [] for t in WEIGHT_TYPES}
    seen: set[int] = set()
    for name, module in model.named_modules():
        params = [p for p in module.parameters(recurse=False) if id(p) not in seen]
        if not params:
            continue
        seen.update(id(p) for p in params)
        parts = name.split(".")
        if id(module) in norms:
            kind = "norm"
        elif isinstance(module, nn.Embedding) or module is getattr(model, "output", None):
            kind = "embedding"
        elif any(p in _ATTENTION for p in parts):
            kind = "attention"
        elif any(p in _MLP for p in parts):
            kind = "mlp"
        else:
            raise ValueError(f"cannot tell the weight type of {name!r} ({type(module).__name__})")
        groups[kind].extend(params)
    return groups


@torch.no_grad()
def grad_norms(groups: dict[str, list[nn.Parameter]]) -> dict[str, float]:
    """L2 norm of the gradient of each group (0 for a group without gradients)."""
    out = {}
    for kind, params in groups.items():
        grads = [p.grad for p in params if p.grad is not None]
        out[kind] = (
            float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))) if grads else 0.0
        )
    return out


class MetricsLog:
    """Appends one JSON object per line; a resumed run first drops records past its step."""

    def __init__(self, path: str | os.PathLike, resume_step: int | None = None) -> None:
        self.path = Path(path)
        if resume_step is not None and self.path.is_file():
            keep = [line for line in self.path.read_text().splitlines() if json.loads(line)["step"] <= resume_step]
            write_text_atomic(self.path, "".join(f"{line}\n" for line in keep))
        elif resume_step is None:
            self.path.unlink(missing_ok=True)

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
