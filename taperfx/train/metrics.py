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

from taperfx.atomic import write_text
from taperfx.convert import find_norms
from taperfx.errors import DataError

__all__ = ["WEIGHT_TYPES", "weight_types", "grad_norms", "MetricsLog", "read_records"]

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


def read_records(path: Path, *, drop_partial_tail: bool = False) -> list[dict]:
    """The records of a ``metrics.jsonl``; a damaged line is an error naming the file and line.

    ``drop_partial_tail``: a last line without its newline that does not parse is the
    append a killed run left half-written, and is dropped (resume rewrites it).
    """
    lines = path.read_bytes().split(b"\n")  # decoded line by line: bytes that are not UTF-8 are that line's damage
    records = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or "step" not in record:
                raise ValueError("not a metrics record (no step)")
        except ValueError as exc:
            if drop_partial_tail and lineno == len(lines):  # the text ends without a newline here
                break
            raise DataError(f"{path}:{lineno}: damaged record ({exc})", code="bad-metrics") from None
        records.append(record)
    return records


class MetricsLog:
    """Appends one JSON object per line; a resumed run first drops the records its resumed steps will rewrite.

    Those are the records past the resumed step and the end-of-run (``final``) record:
    resuming a finished run evaluates and writes it again, so it must not appear twice.
    """

    def __init__(self, path: str | os.PathLike, resume_step: int | None = None) -> None:
        self.path = Path(path)
        if resume_step is not None and self.path.is_file():
            keep = [
                r
                for r in read_records(self.path, drop_partial_tail=True)
                if r["step"] <= resume_step and not r.get("final")
            ]
            write_text(self.path, "".join(f"{json.dumps(r)}\n" for r in keep))
        elif resume_step is None:
            self.path.unlink(missing_ok=True)

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
