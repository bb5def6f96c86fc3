"""``taperfx export-hf``: a gate-zero taperfx checkpoint of a Hugging Face model → a folded transformers directory."""

from __future__ import annotations

import argparse


def _export_hf(args) -> int:
    from taperfx.hf.folded import save_folded
    from taperfx.models import HFSource, source_from_dict
    from taperfx.train.checkpoint import load_model

    model, meta = load_model(args.checkpoint)
    source = source_from_dict(meta["model"])
    if not isinstance(source, HFSource):
        raise ValueError(
            f"{args.checkpoint} holds a reference taperfx model, not a Hugging Face one; use `taperfx export`"
        )
    if not meta["gate_zero"]:
        raise ValueError(f"{args.checkpoint} is at gate {meta['gate']}, not 0: only a fully tapered model folds")
    report = save_folded(model, args.out, tokenizer_from=args.tokenizer or source.path)
    print(report)
    print(f"wrote {args.out} (load with taperfx.hf.load_folded)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export-hf", help="fold a gate-zero checkpoint of a Hugging Face model and save it with save_pretrained"
    )
    p.add_argument("checkpoint", help="taperfx checkpoint or run directory trained with --init-from hf:PATH")
    p.add_argument("--out", required=True, help="new directory for the transformers checkpoint")
    p.add_argument("--tokenizer", help="directory whose tokenizer to include (default: the checkpoint's source model)")
    p.set_defaults(func=_export_hf)
