"""``taperfx export onnx CHECKPOINT_OR_PROGRAM -o DIR``: write the deployable ONNX decoder.

The source is a checkpoint (or a run directory: its latest checkpoint), exported
and folded when its gate is 0 (or already folded on disk by ``taperfx fold CKPT -o
DIR``), or a ``.pt2`` program saved by ``taperfx fold`` (or
``torch.export.save``) that follows the decoder calling convention.
"""

from __future__ import annotations

from pathlib import Path

from taperfx.commands.outputs import check_output_dir
from taperfx.errors import BadInput
from taperfx.quantize.arguments import add_quantize_argument, quantize_config


def add_arguments(p) -> None:
    p.add_argument("source", help="checkpoint directory (folded or not), run directory or .pt2 ExportedProgram")
    p.add_argument("-o", "--out", required=True, help="output directory (model.onnx goes there)")
    p.add_argument(
        "--opset", type=int, default=None, help="18 or above; default: 23 if the graph keeps an RMSNorm, else 18"
    )
    add_quantize_argument(p)


def _load_source(path: Path):
    if path.is_file():
        if path.suffix != ".pt2":
            raise BadInput(f"{path}: expected a checkpoint directory or a .pt2 ExportedProgram", code="bad-source")
        from taperfx.export.program import load_program

        return load_program(path)[0]
    from taperfx.checkpoint_fold import load_inference_model

    return load_inference_model(path)[0]


def run(args) -> int:
    import onnx

    newest = onnx.defs.onnx_opset_version()
    if args.opset is not None and not 18 <= args.opset <= newest:
        raise BadInput(f"--opset {args.opset}: expected 18 (the decoder's ops) to {newest} (this onnx)", "bad-opset")
    config = quantize_config(args)
    check_output_dir(args.out)
    source = _load_source(Path(args.source))
    if config is None:
        from taperfx.export.onnx_export import export_onnx

        path = export_onnx(source, args.out, opset=args.opset)
    else:
        path = _export_quantized(source, args, config)
    print(f"wrote {path}")
    return 0


def _export_quantized(source, args, config):
    """ONNX Runtime's MatMulNBits over the fp32 export; prints the agreement with the float model."""
    import torch

    from taperfx.export.ort_decoder import OnnxDecoder
    from taperfx.export.quantized import export_onnx_quantized, probe_tokens
    from taperfx.quantize import agreement

    path = export_onnx_quantized(source, args.out, config, opset=args.opset)
    print(f"quantized {config.name} with ONNX Runtime's MatMulNBits")
    if isinstance(source, torch.nn.Module):
        ids = probe_tokens(source.config.vocab_size, source.config.max_seq_len)
        print(f"{agreement(source, OnnxDecoder(path), ids)} (random tokens)")
    return path
