"""Capture a reference decoder as one ExportedProgram with an explicit, dynamic KV cache.

Every deployment path (ONNX, ONNX Runtime) starts from the same program: inputs
``input_ids`` and ``positions`` (B, T) and one (key, value) pair per layer of
shape (B, H, P, Dh); outputs the logits and the grown cache. Batch, sequence and
past length are symbolic, so one graph serves prefill (P = 0) and every decode
step (T = 1).

The example used for tracing has B = 2, T = 3, P = 4 on purpose: torch.export
specializes dimensions of size 0 and 1, and a program traced on a zero-length
cache would be valid for P = 0 only.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import torch
from torch.export import Dim, ExportedProgram

from taperfx.convert import gate_of
from taperfx.errors import BadInput, DataError
from taperfx.models import Decoder
from taperfx.passes import fold

__all__ = [
    "decoder_program",
    "decoder_layers",
    "refuse_quantized",
    "deployable_program",
    "save_program",
    "load_program",
    "PROGRAM_META",
    "TOKENIZER_KEY",
]

# The checkpoint metadata (model and training config) a saved program carries, so that
# `taperfx eval` can score it on the trainer's own validation windows.
PROGRAM_META = "taperfx.json"
# The key of that metadata under which `taperfx fold` records its tokenizer's fingerprint
# (taperfx.train.tokens.tokenizer_fingerprint), so that `taperfx eval` refuses data of another tokenizer.
TOKENIZER_KEY = "tokenizer_sha256"

_EXAMPLE_BATCH, _EXAMPLE_SEQ, _EXAMPLE_PAST = 2, 3, 4


def _example_inputs(model: Decoder) -> tuple:
    c = model.config
    if c.max_seq_len < _EXAMPLE_SEQ + _EXAMPLE_PAST:
        raise BadInput(f"export needs max_seq_len >= {_EXAMPLE_SEQ + _EXAMPLE_PAST}, got {c.max_seq_len}")
    p = next(model.parameters())
    ids = torch.zeros(_EXAMPLE_BATCH, _EXAMPLE_SEQ, dtype=torch.long, device=p.device)
    positions = (torch.arange(_EXAMPLE_SEQ, device=p.device) + _EXAMPLE_PAST).expand(_EXAMPLE_BATCH, -1)
    kv_shape = (_EXAMPLE_BATCH, c.n_heads, _EXAMPLE_PAST, c.head_dim)
    # Distinct tensors for every key and value: the exporter merges inputs that are the same object.
    cache = [tuple(torch.zeros(kv_shape, dtype=p.dtype, device=p.device) for _ in "kv") for _ in range(c.n_layers)]
    return ids, positions, cache


def _dynamic_shapes(n_layers: int) -> dict:
    batch, seq, past = Dim("batch"), Dim("sequence"), Dim("past_sequence", min=0)
    kv = {0: batch, 2: past}
    return {
        "input_ids": {0: batch, 1: seq},
        "positions": {0: batch, 1: seq},
        "past_key_values": [(kv, kv) for _ in range(n_layers)],
    }


def decoder_program(model: Decoder) -> ExportedProgram:
    """``torch.export`` of ``model`` in eval mode with dynamic batch, sequence and past length."""
    if not isinstance(model, Decoder):
        raise TypeError(f"expected a taperfx reference decoder (Llama, GPT2), got {type(model).__name__}")
    if model.training:
        raise BadInput("export the model in eval mode (model.eval()): training mode updates calibration state")
    with torch.no_grad():
        return torch.export.export(
            model, _example_inputs(model), dynamic_shapes=_dynamic_shapes(model.config.n_layers), strict=False
        )


def decoder_layers(program: ExportedProgram) -> int:
    """The layer count of a program with ``decoder_program``'s calling convention (input_ids, positions, a (key,
    value) pair per layer); any other program (a .pt2 of some other model) is refused before it runs."""
    n_inputs = len(program.graph_signature.user_inputs)
    if n_inputs < 4 or n_inputs % 2:
        raise DataError(
            f"the program takes {n_inputs} inputs; a taperfx decoder takes input_ids, positions "
            "and a (key, value) pair per layer",
            code="not-a-decoder",
        )
    return (n_inputs - 2) // 2


def refuse_quantized(program: ExportedProgram) -> None:
    """A program already quantized by taperfx (``taperfx fold --quantize``) calls ``taperfx::`` operators that
    ONNX has no translation for: refused before anything is written (export the float program and quantize
    in the export instead)."""
    calls = {n.target for n in program.graph.nodes if n.op == "call_function"}
    ours = sorted({str(t) for t in calls if getattr(t, "namespace", None) == "taperfx"})
    if ours:
        raise BadInput(
            f"the program is quantized ({', '.join(ours)}); export the unquantized program or the checkpoint, "
            "with --quantize to quantize it for ONNX Runtime",
            code="quantized-program",
        )


def deployable_program(model: Decoder) -> ExportedProgram:
    """The program to ship: folded when every TaperNorm is at g = 0, otherwise exported as is.

    A gate strictly between 0 and 1 still needs the per-token statistics, so the
    norms stay in the graph; a baseline model (no TaperNorm) has nothing to fold.
    """
    program = decoder_program(model)
    return fold(program) if gate_of(model) == 0.0 else program


def save_program(program: ExportedProgram, path: str | os.PathLike, meta: dict | None = None) -> Path:
    """``torch.export.save`` to ``path`` atomically, with ``meta`` (JSON) stored beside the program."""
    from taperfx.atomic import atomic_path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:  # the temporary keeps the .pt2 suffix torch.export.save expects
        torch.export.save(program, tmp, extra_files={PROGRAM_META: json.dumps(meta or {})})
    return path


def load_program(path: str | os.PathLike) -> tuple[ExportedProgram, dict]:
    """A program written by ``save_program`` (or plain ``torch.export.save``: meta ``{}``) and its meta."""
    from taperfx.errors import InputNotFound

    path = Path(path)
    if not path.is_file():
        if path.is_dir():
            raise BadInput(f"{path} is a directory, not a .pt2 program", code="program-is-directory")
        raise InputNotFound(f"{path} does not exist")
    if not zipfile.is_zipfile(path):  # torch would log its own traceback before raising
        raise DataError(f"{path} is not a program saved by torch.export.save (not a .pt2 archive)", "not-a-program")
    import taperfx.quantize.ops  # noqa: F401  (registers the taperfx:: operators a quantized program calls)

    extra = {PROGRAM_META: ""}
    try:
        program = torch.export.load(path, extra_files=extra)
    except Exception as exc:  # zipfile, pickle and torch each raise their own type for a damaged archive
        raise DataError(f"{path} is not a program saved by torch.export.save ({exc})", code="not-a-program") from exc
    return program, json.loads(extra[PROGRAM_META] or "{}")
