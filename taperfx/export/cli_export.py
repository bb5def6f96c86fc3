"""``taperfx export onnx CHECKPOINT_OR_PROGRAM -o DIR``: write the deployable ONNX decoder.

The source is a checkpoint (or a run directory: its latest checkpoint), exported
and folded when its gate is 0, or a ``.pt2`` ExportedProgram saved with
``torch.export.save`` that already follows the decoder calling convention.
"""

from __future__ import annotations

from pathlib import Path

import torch

from taperfx.export.onnx_export import export_onnx
from taperfx.export.ort_decoder import OnnxDecoder
from taperfx.export.program_decoder import load_program
from taperfx.export.quantized import export_onnx_quantized, probe_tokens
from taperfx.quantize import agreement
from taperfx.quantize.arguments import add_quantize_argument, quantize_config
from taperfx.train.checkpoint import load_model


def _load_source(path: Path):
    if path.is_file():
        if path.suffix != ".pt2":
            raise ValueError(f"{path}: expected a checkpoint directory or a .pt2 ExportedProgram")
        return load_program(path)
    model, _ = load_model(path)
    return model


def run_onnx(args) -> int:
    config = quantize_config(args)
    source = _load_source(Path(args.source))
    if config is None:
        path = export_onnx(source, args.out, opset=args.opset)
    else:
        path = export_onnx_quantized(source, args.out, config, opset=args.opset)
        print(f"quantized {config.name} with ONNX Runtime's MatMulNBits")
        if isinstance(source, torch.nn.Module):
            ids = probe_tokens(source.config.vocab_size, source.config.max_seq_len)
            print(f"{agreement(source, OnnxDecoder(path), ids)} (random tokens)")
    print(f"wrote {path}")
    return 0


def register(sub) -> None:
    export = sub.add_parser("export", help="write a deployable model")
    formats = export.add_subparsers(dest="format", metavar="FORMAT", required=True)
    p = formats.add_parser("onnx", help="ONNX decoder with the KV cache as inputs and outputs")
    p.add_argument("source", help="checkpoint directory, run directory or .pt2 ExportedProgram")
    p.add_argument("-o", "--out", required=True, help="output directory (model.onnx goes there)")
    p.add_argument("--opset", type=int, default=None, help="default: 23 if the graph keeps an RMSNorm, else 18")
    add_quantize_argument(p)
    p.set_defaults(func=run_onnx)
