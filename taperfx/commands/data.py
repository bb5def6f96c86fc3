"""``taperfx data prepare [FILES] --out DIR``: a tokenizer and memory-mapped token streams."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from taperfx.commands.outputs import check_output_dir
from taperfx.errors import BadInput


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def add_arguments(p) -> None:
    p.add_argument(
        "inputs",
        nargs="*",
        help=".txt (TinyStories or one document per line) or .jsonl files; none: the synthetic corpus",
    )
    p.add_argument("--out", default="data/default", help="output directory (an interrupted run resumes in it)")
    p.add_argument(
        "--vocab-size",
        type=int,
        help="exact number of tokenizer pieces (refused if the corpus cannot support it); "
        "default: 4096, or fewer if that is all the corpus supports",
    )
    p.add_argument(
        "--character-coverage", type=_fraction, help="share of characters given their own piece (default 0.9995)"
    )
    p.add_argument(
        "--no-byte-fallback",
        dest="byte_fallback",
        action="store_const",
        const=False,
        help="map characters outside the coverage to <unk> instead of spelling them as UTF-8 bytes",
    )
    p.add_argument("--val-fraction", type=_fraction, default=0.05, help="share of documents held out")
    p.add_argument(
        "--split",
        choices=("interleaved", "tail"),
        default="interleaved",
        help="held-out documents: every k-th one (interleaved) or the last ones (tail)",
    )
    p.add_argument("--text-field", default="text", help="field of .jsonl records holding the text")
    p.add_argument("--stories", type=int, default=12000, help="size of the synthetic corpus (no inputs given)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--hf-tokenizer",
        metavar="PATH",
        help="tokenize with this Hugging Face checkpoint's tokenizer instead of training one",
    )


def run(args) -> int:
    check_output_dir(args.out, "--out")
    # The flags that shape a trained tokenizer, where given (prepare_data's defaults otherwise).
    tokenizer = {k: getattr(args, k) for k in ("vocab_size", "character_coverage", "byte_fallback")}
    tokenizer = {k: v for k, v in tokenizer.items() if v is not None}
    if args.hf_tokenizer:
        if tokenizer:
            raise BadInput(
                "--vocab-size, --character-coverage and --no-byte-fallback shape a trained tokenizer; "
                "--hf-tokenizer uses the checkpoint's own",
                code="conflicting-flags",
            )
        from taperfx.hf.data import prepare_text

        out = prepare_text(
            args.hf_tokenizer,
            args.inputs,
            args.out,
            val_fraction=args.val_fraction,
            split=args.split,
            text_field=args.text_field,
        )
        print(f"prepared {out}")
        return 0
    from taperfx.train.prepare import DEFAULT_VOCAB_SIZE, prepare_data

    out = prepare_data(
        args.out,
        args.inputs,
        val_fraction=args.val_fraction,
        split=args.split,
        text_field=args.text_field,
        n_stories=args.stories,
        seed=args.seed,
        **tokenizer,
    )
    meta = json.loads((Path(out) / "meta.json").read_text())
    if args.vocab_size is None and meta["vocab_size"] < DEFAULT_VOCAB_SIZE:
        print(
            f"vocabulary: {meta['vocab_size']} pieces, all this corpus supports "
            f"(the default asks for {DEFAULT_VOCAB_SIZE}; --vocab-size N insists on N)"
        )
    tokens = meta["tokens"]
    print(f"prepared {out}: {tokens['train']} training and {tokens['val']} held-out tokens")
    return 0


def interrupted(args) -> str:
    if not Path(args.out).is_dir():
        return "nothing was written"
    return f"finished stages are kept in {args.out}; run the same command again to resume"
