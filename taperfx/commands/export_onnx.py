"""``taperfx export onnx CHECKPOINT_OR_PROGRAM -o DIR``: write the deployable ONNX decoder.

The source is a checkpoint (or a run directory: its latest checkpoint), exported
and folded when its gate is 0, or a ``.pt2`` program saved by ``taperfx fold`` (or
``torch.export.save``) that follows the decoder calling convention.
"""

from __future__ import annotations

from pathlib import Path

from taperfx.commands.outputs import check_output_dir
from taperfx.errors import BadInput


def add_arguments(p) -> None:
    p.add_argument("source", help="checkpoint directory, run directory or .pt2 ExportedProgram")
    p.add_argument("-o", "--out", required=True, help="output directory (model.onnx goes there)")
    p.add_argument(
        "--opset", type=int, default=None, help="18 or above; default: 23 if the graph keeps an RMSNorm, else 18"
    )


def _load_source(path: Path):
    if path.is_file():
        if path.suffix != ".pt2":
            raise BadInput(f"{path}: expected a checkpoint directory or a .pt2 ExportedProgram", code="bad-source")
        from taperfx.export.program import load_program

        return load_program(path)[0]
    from taperfx.train.checkpoint import load_model

    return load_model(path)[0]


def run(args) -> int:
    if args.opset is not None and args.opset < 18:
        raise BadInput(f"--opset {args.opset}: the decoder needs opset 18 or above", code="bad-opset")
    check_output_dir(args.out)
    from taperfx.export.onnx_export import export_onnx

    path = export_onnx(_load_source(Path(args.source)), args.out, opset=args.opset)
    print(f"wrote {path}")
    return 0
