"""How long after initialisation ``c`` can be calibrated: the residual stream's early growth, measured.

``c`` matches the un-normalized branch to the normalized one in energy (``c ≈ 1/r(x)``) and
is frozen when the taper starts. This trains a from-scratch model with the gate held at 1
and reads, every few steps, the ``c`` each TaperNorm would freeze if the taper started
then (``TaperNorm.calibrated_c``, the default EMA). A ``c`` frozen at step ``t`` is too
large for the stream at a later step ``t'`` by ``c(t) / c(t')``; the table gives, per
freezing step, the worst such ratio over the rest of the run (the largest factor by which
the g = 0 branch overshoots the normalized one at that layer).

    nice -n 10 python bench/calibration_transient.py --width 64 --depth 8 --steps 400
    -> bench/results/calibration_transient_w64.{json,md}
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from _runs import machine, use_threads
from reproduce_realtext import prepare_corpus

from taperfx.atomic import write_text
from taperfx.convert import tapernorms
from taperfx.train.config import load_config
from taperfx.train.loop import Trainer

FREEZE_AT = (2, 10, 20, 50, 100, 150, 200)


def measure(data: Path, args: argparse.Namespace) -> list[dict]:
    """``[{"step": t, "c": [c of every TaperNorm]}]`` every ``args.every`` steps of a run held at g = 1."""
    config = load_config(
        None,
        [
            f"data={json.dumps(str(data))}",
            f"out={json.dumps(str(args.work / f'transient-w{args.width}'))}",
            f"model.preset='tinystories-{args.width}'",
            f"model.n_layers={args.depth}",
            f"steps={args.steps}",
            f"batch_size={args.batch_size}",
            f"context={args.context}",
            f"lr={args.lr}",
            "protocol='internal'",
            f"calibration_steps={args.steps - 1}",  # the gate stays at 1: calibration never stops
            f"eval_interval={args.steps}",
            f"checkpoint_interval={args.steps}",
            "progress=false",
        ],
    )
    trainer = Trainer(config)
    norms = list(tapernorms(trainer.model))
    trace = []
    while trainer.step < args.steps - 1:
        trainer.train_step(with_stats=False)
        if trainer.step % args.every == 0 or trainer.step in FREEZE_AT:
            trace.append({"step": trainer.step, "c": [float(n.calibrated_c) for n in norms]})
    return trace


def overshoot(trace: list[dict], freeze_at: int) -> list[float]:
    """Per norm: max over later steps of ``c(freeze_at) / c(t')``."""
    frozen = next(r["c"] for r in trace if r["step"] == freeze_at)
    later = [r["c"] for r in trace if r["step"] > freeze_at]
    return [max(f / c[i] for c in later) for i, f in enumerate(frozen)]


def markdown(result: dict) -> str:
    s, m = result["settings"], result["machine"]
    lines = [
        f"# Calibration transient: width {s['width']}, depth {s['depth']}",
        "",
        f"{m['cpu']}, {m['cores']} cores (1 torch thread), torch {m['torch']}, {result['date']}. Austen corpus, "
        f"llama depth {s['depth']}, width {s['width']}, {s['batch_size']} × {s['context']} tokens per step, "
        f"lr {s['lr']} (5 % warm-up, cosine over {s['steps']} steps), gate held at 1. `c(t)`: what a taper "
        "starting at step t would freeze (default EMA, α = 0.01).",
        "",
        "Worst overshoot of a `c` frozen at step t: max over later steps t' of c(t)/c(t'), over all norms "
        "(and the median norm's).",
        "",
        "| freeze at step | worst overshoot (all norms) | median norm's worst overshoot |",
        "|---|---|---|",
    ]
    for t, row in result["overshoot"].items():
        ordered = sorted(row)
        lines.append(f"| {t} | {max(row):.2f}× | {ordered[len(ordered) // 2]:.2f}× |")
    lines += ["", "`c(t)` of every second norm (the attention norms, by layer):", ""]
    lines += ["| step | " + " | ".join(f"layer {i}" for i in range(len(result["trace"][0]["c"][::2]))) + " |"]
    lines += ["|---" * (1 + len(result["trace"][0]["c"][::2])) + "|"]
    for r in result["trace"]:
        lines.append(f"| {r['step']} | " + " | ".join(f"{c:.3g}" for c in r["c"][::2]) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--depth", type=int, default=8)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--every", type=int, default=10)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work", type=Path, default=Path("out/realtext"))
    p.add_argument("--data", type=Path, help="an already prepared data directory (default: prepare the Austen corpus)")
    p.add_argument("--results", type=Path, default=Path("bench/results"))
    args = p.parse_args()
    if args.steps <= max(FREEZE_AT) + args.every:
        p.error(f"--steps must exceed {max(FREEZE_AT) + args.every} to follow c after the last freezing step")
    use_threads(args.threads)
    data = args.data or prepare_corpus(args.work, "austen", args.vocab_size)
    trace = measure(data, args)
    settings = {k: getattr(args, k) for k in ("width", "depth", "steps", "batch_size", "context", "lr")}
    result = {
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "settings": settings,
        "overshoot": {t: overshoot(trace, t) for t in FREEZE_AT},
        "trace": trace,
    }
    stem = args.results / f"calibration_transient_w{args.width}"
    write_text(stem.with_suffix(".json"), json.dumps(result, indent=1) + "\n")
    write_text(stem.with_suffix(".md"), markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
