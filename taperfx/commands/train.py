"""``taperfx train [CONFIG.toml] [--set KEY=VALUE ...]``: train with TaperNorm to a gate-zero checkpoint."""

from __future__ import annotations

import json

from taperfx.commands.outputs import check_output_dir
from taperfx.errors import WriteFailed
from taperfx.kinds import Protocol

DEFAULT_OUT = "runs/default"


def add_arguments(p) -> None:
    p.add_argument("config", nargs="?", help="TOML config file (see taperfx/train/config.py)")
    p.add_argument("--data", help="prepared data directory")
    p.add_argument("--out", help="run directory (checkpoints, metrics.jsonl)")
    p.add_argument("--init-from", metavar="hf:PATH", help="fine-tune a local Hugging Face checkpoint directory")
    p.add_argument(
        "--finetune-preset",
        metavar="NAME",
        help="the paper's GPT-2 fine-tuning schedule (steps, LR warmup, taper window): gpt2-small ... gpt2-xl",
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


def _config(args):
    from taperfx.train.checkpoint import read_meta
    from taperfx.train.config import load_config

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
    saved = read_meta(args.out or DEFAULT_OUT)["train"] if args.resume and args.config is None else None
    return load_config(args.config, overrides + args.set, base=saved)


def _resume_hint(out: str) -> str:
    from taperfx.train.checkpoint import list_checkpoints

    found = list_checkpoints(out)
    if not found:
        return f"no checkpoint was written in {out}; run the command again to start over"
    return f"the last complete checkpoint is {found[-1]}; continue with `taperfx train --out {out} --resume`"


def run(args) -> int:
    from taperfx.train.checkpoint import read_meta
    from taperfx.train.loop import train

    config = _config(args)  # every value checked before anything is written
    check_output_dir(config.out, "--out")
    args.run_dir = config.out
    try:
        path = train(config, resume=args.resume)
    except WriteFailed as exc:
        raise WriteFailed(f"{exc}; {_resume_hint(config.out)}", code=exc.code) from exc
    if path is not None:  # rank 0 only
        meta = read_meta(path)
        if meta["gate"] is None:
            state = "plain norms"
        else:
            state = "gate 0 (ready to fold)" if meta["gate_zero"] else f"gate {meta['gate']} (NOT gate-zero)"
        print(f"final checkpoint: {path}, {config.protocol}, {state}, val loss {meta['val_loss']:.4f}")
    return 0


def interrupted(args) -> str:
    out = getattr(args, "run_dir", None)
    return "nothing was written" if out is None else _resume_hint(out)
