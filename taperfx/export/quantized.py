"""ONNX with quantized weights: the fp32 export, its output head untied, then ONNX Runtime's block-wise
``MatMulNBits`` quantizer.

Why the untie: the exporter writes a tied head as ``MatMul(x, Transpose(embedding))``,
whose weight is not a constant, so ONNX Runtime's quantizer skips it and the
largest matrix of a small model stays fp32. The head gets its own (transposed)
initializer first; the token embedding's ``Gather`` keeps the fp32 table unless
``config.embedding`` asks for ``GatherBlockQuantized``.

Speed comes from ``accuracy_level=4`` (int8 activations inside the kernel): the
default level dequantizes to fp32 and was slower than the fp32 model on this CPU
(BENCHMARKS.md, Quantization). int4 uses the config's group size as the block;
int8 (per-row in torch) uses ``INT8_BLOCK``, as the QOperator format has no per-row mode.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch.export import ExportedProgram

from taperfx.export.onnx_export import ONNX_FILENAME, export_onnx
from taperfx.export.program import refuse_quantized
from taperfx.export.program_decoder import ProgramDecoder
from taperfx.quantize import Int4WeightOnly, QuantizeConfig, UnsupportedShape, agreement, quantize_program

__all__ = [
    "export_onnx_quantized",
    "untie_transposed_weights",
    "quantize_folded_program",
    "probe_tokens",
    "QUANTIZATION_KEY",
    "ACCURACY_LEVEL",
    "INT8_BLOCK",
]

QUANTIZATION_KEY = "taperfx.quantization"
PROBE_BATCH, PROBE_TOKENS, PROBE_SEED = 4, 64, 0
ACCURACY_LEVEL = 4
INT8_BLOCK = 128


def untie_transposed_weights(model: onnx.ModelProto) -> list[str]:
    """Give every ``MatMul`` that reads ``Transpose(initializer)`` its own transposed initializer.

    Returns the names of the MatMul nodes changed (the tied output head). The
    Transpose stays only while something else reads it.
    """
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    changed = []
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] in initializers:
            continue
        source = producers.get(node.input[1])
        if source is None or source.op_type != "Transpose" or source.input[0] not in initializers:
            continue
        perm = next((list(a.ints) for a in source.attribute if a.name == "perm"), None)
        weight = numpy_helper.to_array(initializers[source.input[0]])
        if weight.ndim != 2 or perm not in (None, [1, 0]):
            continue
        name = f"{node.name}.weight_transposed"
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(weight.T), name))
        node.input[1] = name
        changed.append(node.name)
    readers = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    dead = [n for n in graph.node if n.op_type == "Transpose" and not set(n.output) & readers]
    for node in dead:
        graph.node.remove(node)
    return changed


@contextlib.contextmanager
def _quiet(logger: logging.Logger):
    """ONNX Runtime's quantizer logs a line per node at INFO; keep its warnings only."""
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def _head_nodes(model: onnx.ModelProto) -> list[str]:
    """MatMul nodes that produce the ``logits`` output (possibly through a reshape or cast)."""
    producers = {out: node for node in model.graph.node for out in node.output}
    node = producers.get("logits")
    while node is not None and node.op_type != "MatMul" and node.input:
        node = producers.get(node.input[0])
    return [node.name] if node is not None and node.op_type == "MatMul" else []


def _quantizer(model: onnx.ModelProto, config: QuantizeConfig, accuracy_level: int | None):
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    int4 = isinstance(config, Int4WeightOnly)
    return MatMulNBitsQuantizer(
        model,
        bits=4 if int4 else 8,
        block_size=config.group_size if int4 else INT8_BLOCK,
        is_symmetric=False,
        accuracy_level=accuracy_level,
        nodes_to_exclude=[] if config.head else _head_nodes(model),
        op_types_to_quantize=("MatMul", "Gather") if config.embedding else ("MatMul",),
        quant_axes=(("MatMul", 0), ("Gather", 1)),
    )


def export_onnx_quantized(
    source,
    out_dir: str | os.PathLike,
    config: QuantizeConfig,
    *,
    opset: int | None = None,
    accuracy_level: int | None = ACCURACY_LEVEL,
    untie_head: bool = True,
) -> Path:
    """Export ``source`` (a decoder or a decoder program, see ``export_onnx``) and quantize its weights.

    Writes ``out_dir/model.onnx`` (renamed into place, checked with ``onnx.checker``); the
    scheme is recorded in the metadata under ``QUANTIZATION_KEY`` beside the source's fingerprint.
    ``accuracy_level`` (MatMulNBits' attribute) and ``untie_head=False`` exist to measure the
    alternatives the defaults were chosen over (bench/quantize_decode.py).
    """
    if isinstance(source, torch.export.ExportedProgram):
        refuse_quantized(source)  # before out_dir is made
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".onnx-quantize-") as staging:
        model = onnx.load(str(export_onnx(source, Path(staging) / "fp32", opset=opset)))
        if untie_head:
            untie_transposed_weights(model)
        quantizer = _quantizer(model, config, accuracy_level)
        with _quiet(logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")):
            quantizer.process()
        quantized = quantizer.model.model
        ops = {node.op_type for node in quantized.graph.node}
        if "MatMulNBits" not in ops:
            raise UnsupportedShape(f"ONNX Runtime's quantizer left every MatMul in fp32 ({config.name})")
        entry = next((p for p in quantized.metadata_props if p.key == QUANTIZATION_KEY), None)
        entry = entry or quantized.metadata_props.add()
        entry.key, entry.value = QUANTIZATION_KEY, config.name
        staged = Path(staging) / ONNX_FILENAME
        onnx.save(quantized, str(staged))
        onnx.checker.check_model(str(staged), full_check=True)
        os.replace(staged, out_dir / ONNX_FILENAME)
    return out_dir / ONNX_FILENAME


def probe_tokens(vocab_size: int, max_seq_len: int) -> torch.Tensor:
    """The fixed random token batch the commands' agreement line is measured on (the same on every call)."""
    generator = torch.Generator().manual_seed(PROBE_SEED)
    return torch.randint(0, vocab_size, (PROBE_BATCH, min(PROBE_TOKENS, max_seq_len)), generator=generator)


def quantize_folded_program(
    program: ExportedProgram, config: QuantizeConfig, vocab_size: int, max_seq_len: int, echo=print
) -> ExportedProgram:
    """Quantize a folded decoder program; ``echo`` its report and its agreement with ``program``."""
    quantized, report = quantize_program(program, config)
    echo(str(report))
    ids = probe_tokens(vocab_size, max_seq_len)
    echo(f"{agreement(ProgramDecoder(program), ProgramDecoder(quantized), ids)} (random tokens)")
    return quantized
