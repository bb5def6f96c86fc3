"""Sub-commands ``taperfx data prepare``, ``taperfx train`` and ``taperfx plot``."""

from __future__ import annotations

import argparse
import json

from taperfx.kinds import Protocol


def _prepare(args) -> int:
    from taperfx.train.prepare import prepare_data

    if args.hf_tokenizer:
        from taperfx.hf.data import prepare_text

        out = prepare_text(
            args.hf_tokenizer, args.inputs, args.out, val_fraction=args.val_fraction, text_field=args.text_field
        )
        print(f"prepared {out}")
        return 0
    out = prepare_data(
        args.out,
        args.inputs,
        vocab_size=args.vocab_size,
        val_fraction=args.val_fraction,
        text_field=args.text_field,
        n_stories=args.stories,
        seed=args.seed,
    )
    print(f"prepared {out}")
    return 0


def _train(args) -> int:
    from taperfx.train.checkpoint import read_meta
    from taperfx.train.config import load_config
    from taperfx.train.loop import train

    named = {
        "data": args.data,
        "out": args.out,
        "init_from": args.init_from,
        "protocol": args.protocol,
        "steps": args.steps,
        "scale_loss_weight": args.scale_loss_weight,
        "seed": args.seed,
        "device": args.device,
    }
    overrides = [f"{k}={json.dumps(v)}" for k, v in named.items() if v is not None]  # JSON scalars are TOML
    if args.compile:
        overrides.append("compile=true")
    if args.finetune_preset:
        from taperfx.hf.presets import finetune_preset  # the paper's GPT-2 schedules; the user's keys win

        overrides = [
            f"{k}={json.dumps(v)}" for k, v in finetune_preset(args.finetune_preset).overrides().items()
        ] + overrides
    # `--resume` alone continues a run with its recorded settings (the latest checkpoint's).
    saved = read_meta(args.out or "runs/default")["train"] if args.resume and args.config is None else None
    config = load_config(args.config, overrides + args.set, base=saved)
    path = train(config, resume=args.resume)
    if path is not None:  # rank 0 only
        meta = read_meta(path)
        if meta["gate"] is None:
            state = "plain norms"
        else:
            state = "gate 0 (ready to fold)" if meta["gate_zero"] else f"gate {meta['gate']} (NOT gate-zero)"
        print(f"final checkpoint: {path}, {config.protocol}, {state}, val loss {meta['val_loss']:.4f}")
    return 0


def _plot(args) -> int:
    from taperfx.train.plot import plot_runs

    for path in plot_runs(args.runs, args.out):
        print(path)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from taperfx.hf.presets import GPT2_FINETUNE  # plain data, importable without the hf extra

    data = sub.add_parser("data", help="prepare training data").add_subparsers(
        dest="data_command", metavar="ACTION", required=True
    )
    p = data.add_parser("prepare", help="train a tokenizer and write memory-mapped token streams")
    p.add_argument(
        "inputs",
        nargs="*",
        help=".txt (TinyStories or one document per line) or .jsonl files; none: the synthetic corpus",
    )
    p.add_argument("--out", default="data/default", help="output directory (an interrupted run resumes in it)")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--val-fraction", type=float, default=0.05)
    p.add_argument("--text-field", default="text", help="field of .jsonl records holding the text")
    p.add_argument("--stories", type=int, default=12000, help="size of the synthetic corpus (no inputs given)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--hf-tokenizer",
        metavar="PATH",
        help="tokenize with this Hugging Face checkpoint's tokenizer instead of training one",
    )
    p.set_defaults(func=_prepare)

    p = sub.add_parser("train", help="train with TaperNorm to a gate-zero checkpoint")
    p.add_argument("config", nargs="?", help="TOML config file (see taperfx/train/config.py)")
    p.add_argument("--data", help="prepared data directory")
    p.add_argument("--out", help="run directory (checkpoints, metrics.jsonl)")
    p.add_argument("--init-from", metavar="hf:PATH", help="fine-tune a local Hugging Face checkpoint directory")
    p.add_argument(
        "--finetune-preset",
        choices=sorted(GPT2_FINETUNE),
        help="the paper's GPT-2 fine-tuning schedule: steps, LR warmup, taper window",
    )
    p.add_argument("--protocol", choices=[p.value for p in Protocol])
    p.add_argument("--steps", type=int)
    p.add_argument("--scale-loss-weight", type=float, help="λ of the fixed-target scale loss; 0 switches it off")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--resume", action="store_true", help="continue from the run directory's latest checkpoint")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override any config key (model.dim=128)"
    )
    p.set_defaults(func=_train)

    p = sub.add_parser("plot", help="figures from the metrics of one or more runs")
    p.add_argument("runs", nargs="+", help="run directories")
    p.add_argument("--out", default="plots", help="where the PNGs go")
    p.set_defaults(func=_plot)
