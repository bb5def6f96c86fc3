"""``taperfx export hf CHECKPOINT --out DIR``: a gate-zero checkpoint of a Hugging Face model → a folded
transformers directory (``save_pretrained``), loadable with ``taperfx.hf.load_folded``."""

from __future__ import annotations

from taperfx.commands.outputs import check_output_dir
from taperfx.errors import BadInput


def add_arguments(p) -> None:
    p.add_argument("checkpoint", help="taperfx checkpoint or run directory trained with --init-from hf:PATH")
    p.add_argument("-o", "--out", required=True, help="new directory for the transformers checkpoint")
    p.add_argument("--tokenizer", help="directory whose tokenizer to include (default: the checkpoint's source model)")


def run(args) -> int:
    check_output_dir(args.out, "--out", new=True)
    from taperfx.hf.folded import save_folded
    from taperfx.models import HFSource, source_from_dict
    from taperfx.train.checkpoint import load_model

    model, meta = load_model(args.checkpoint)
    source = source_from_dict(meta["model"])
    if not isinstance(source, HFSource):
        raise BadInput(
            f"{args.checkpoint} holds a reference taperfx model, not a Hugging Face one; use `taperfx fold` "
            "or `taperfx export onnx`",
            code="not-hf",
        )
    if not meta["gate_zero"]:
        raise BadInput(
            f"{args.checkpoint} is at gate {meta['gate']}, not 0: only a fully tapered model folds",
            code="not-gate-zero",
        )
    report = save_folded(model, args.out, tokenizer_from=args.tokenizer or source.path)
    print(report)
    print(f"wrote {args.out} (load with taperfx.hf.load_folded)")
    return 0
