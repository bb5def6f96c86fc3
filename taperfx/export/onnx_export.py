"""Write a decoder as an ONNX model with the KV cache as explicit inputs and outputs.

Names follow the convention ONNX Runtime GenAI and Optimum use, so the file drops
into existing decoding loops::

    inputs   input_ids, position_ids, past_key_values.{i}.key, past_key_values.{i}.value
    outputs  logits, present.{i}.key, present.{i}.value

The opset is chosen per graph so that an unfolded model keeps ONNX's own fused
normalization ops (RMSNormalization exists from opset 23, LayerNormalization from
17): a decomposed norm would make the baseline look slower than it is and any
speed-up from folding unfair.

The model's configuration and a fingerprint of its weights travel in the file's
metadata, so a decoding loop can refuse an ONNX file built from another model.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import onnx
import onnx_ir as ir
import torch
from torch.export import ExportedProgram

from taperfx.atomic import scratch_dir
from taperfx.errors import DataError
from taperfx.export.program import decoder_layers, deployable_program, refuse_quantized
from taperfx.models import Decoder, ModelConfig
from taperfx.passes import fold

__all__ = ["export_onnx", "weights_fingerprint", "read_metadata", "input_names", "output_names", "ONNX_FILENAME"]

ONNX_FILENAME = "model.onnx"
CONFIG_KEY = "taperfx.model_config"
FINGERPRINT_KEY = "taperfx.weights_sha256"
RMS_NORM_OPSET = 23
DEFAULT_OPSET = 18  # LayerNormalization needs >= 17; 18 is the exporter's default


def input_names(n_layers: int) -> list[str]:
    return ["input_ids", "position_ids"] + [
        f"past_key_values.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")
    ]


def output_names(n_layers: int) -> list[str]:
    return ["logits"] + [f"present.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]


def weights_fingerprint(model: torch.nn.Module | ExportedProgram) -> str:
    """SHA-256 over the model's parameters and buffers (names, dtypes, shapes, bytes).

    Computed on the source model before folding, so the checkpoint that produced
    an ONNX file and the file itself can be matched later.
    """
    state = model.state_dict if isinstance(model, ExportedProgram) else model.state_dict()
    digest = hashlib.sha256()
    for name, tensor in sorted(state.items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def _has_rms_norm(program: ExportedProgram) -> bool:
    return any(
        node.op == "call_function" and node.target is torch.ops.aten.rms_norm.default
        for node in program.graph_module.graph.nodes
    )


def choose_opset(program: ExportedProgram) -> int:
    return RMS_NORM_OPSET if _has_rms_norm(program) else DEFAULT_OPSET


def _name_dynamic_axes(graph: ir.Graph) -> None:
    """Give the exporter's symbols (``s17``, ``s0 + s18``) the names users read: batch, sequence, past_sequence."""
    inputs = {v.name: v for v in graph.inputs}
    axes = (("input_ids", 0, "batch"), ("input_ids", 1, "sequence"), ("past_key_values.0.key", 2, "past_sequence"))
    dims = [(inputs[name].shape[axis], label) for name, axis, label in axes]
    labels = {dim.value: label for dim, label in dims if isinstance(dim, ir.SymbolicDim) and dim.value}
    if not labels:  # a program exported with static shapes
        return
    symbol = re.compile(r"\b(" + "|".join(map(re.escape, labels)) + r")\b")

    def renamed(dim):
        if isinstance(dim, ir.SymbolicDim) and dim.value:
            return ir.SymbolicDim(symbol.sub(lambda m: labels[m.group()], dim.value))
        return dim

    for value in [*graph.inputs, *graph.outputs, *(v for node in graph for v in node.outputs)]:
        if value.shape is not None:
            value.shape = ir.Shape([renamed(d) for d in value.shape])


def export_onnx(source: Decoder | ExportedProgram, out_dir: str | os.PathLike, *, opset: int | None = None) -> Path:
    """Export a decoder to ``out_dir/model.onnx`` and return that path.

    ``source`` is a reference model (exported, then folded when its gate is 0) or
    an ExportedProgram with the decoder calling convention (folded where it holds
    gate-zero maps). Files are written next to their destination and renamed into
    place, so a crash never leaves a truncated model behind.
    """
    if isinstance(source, ExportedProgram):
        refuse_quantized(source)
        program, n_layers, config = fold(source), decoder_layers(source), None
    else:
        program, n_layers, config = deployable_program(source), source.config.n_layers, source.config
    onnx_program = torch.onnx.export(
        program,
        dynamo=True,
        opset_version=choose_opset(program) if opset is None else opset,
        input_names=input_names(n_layers),
        output_names=output_names(n_layers),
        verbose=False,
    )
    _name_dynamic_axes(onnx_program.model.graph)
    metadata = onnx_program.model.metadata_props
    metadata[FINGERPRINT_KEY] = weights_fingerprint(source)
    if config is not None:
        metadata[CONFIG_KEY] = json.dumps(config.to_dict(), sort_keys=True)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with scratch_dir(out_dir, ONNX_FILENAME) as staging:
        staged = Path(staging) / ONNX_FILENAME
        onnx_program.save(staged)
        onnx.checker.check_model(str(staged), full_check=True)
        # External weight files (models over 2 GB) first, so model.onnx never points at a missing file.
        for path in sorted(Path(staging).iterdir(), key=lambda p: p.name == ONNX_FILENAME):
            os.replace(path, out_dir / path.name)
    return out_dir / ONNX_FILENAME


def read_metadata(path: str | os.PathLike) -> tuple[ModelConfig | None, str]:
    """The (config, weights fingerprint) a taperfx export stored in an ONNX file (config None for programs)."""
    proto = onnx.load(str(path), load_external_data=False)
    props = {p.key: p.value for p in proto.metadata_props}
    if FINGERPRINT_KEY not in props:
        raise DataError(f"{path} was not written by taperfx export onnx (no {FINGERPRINT_KEY} metadata)")
    config = ModelConfig.from_dict(json.loads(props[CONFIG_KEY])) if CONFIG_KEY in props else None
    return config, props[FINGERPRINT_KEY]
