"""Stability of the default schedule: tapered training at widths 64–512 and several schedule lengths must not diverge.

Every run uses the training defaults (lr 1e-3, 5 % warm-up, clip 1, ``c`` calibrated over
the first 100 steps, taper from there to the last step) on real prose (the Austen corpus of
``reproduce_realtext.py``), depth 4, 16 heads; a schedule the defaults refuse
(``schedule-too-short``; ``schedule_too_short`` in results written before 2026-12-07)
is recorded with its code instead of trained. The widest model
also runs under the two defaults this project had before: ``c`` from the first two
batches (taper at step 2), and from the first 20 steps. Per run: the calibrated ``c``
(mean and max over norms), the largest pre-clip gradient norm during the taper, the
final val loss at g = 0, or the divergence. Finished runs are kept in the JSON, so an
interrupted sweep continues where it stopped.

    nice -n 15 python bench/stability_sweep.py            # -> bench/results/stability_sweep.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

from _runs import machine, use_threads
from reproduce_realtext import prepare_corpus

from taperfx.convert import tapernorms
from taperfx.schedule import ScheduleError
from taperfx.train.config import load_config
from taperfx.train.loop import Trainer, TrainingDiverged

SHAPE = ("depth", "batch_size", "context", "vocab_size")  # what makes runs comparable
# The defaults this project had before, run where they are weakest: the widest model, the shortest schedule
# the current default accepts.
PREVIOUS_DEFAULTS = {
    "first default (c from 2 batches, taper at step 2)": ["calibration_steps=2", "taper_start=2"],
    "second default (c from the first 20 steps)": ["calibration_steps=20"],
}


def _cases(args) -> list[dict]:
    cases = [
        {"width": w, "steps": n, "protocol": p, "setting": "default", "overrides": []}
        for n in args.lengths
        for w in args.widths
        for p in args.protocols
    ]
    trained = [n for n in args.lengths if n >= args.previous_at]
    if not trained:
        return cases
    weakest = {"width": max(args.widths), "steps": min(trained)}
    previous = [
        {**weakest, "protocol": protocol, "setting": setting, "overrides": overrides}
        for setting, overrides in PREVIOUS_DEFAULTS.items()
        for protocol in args.protocols
    ]
    return [*cases, *previous]


def _key(case: dict) -> str:
    return f"{case['setting']}|{case['protocol']}|w{case['width']}|n{case['steps']}"


def run_case(data: Path, work: Path, case: dict, args) -> dict:
    """Train one case from scratch and describe how it went."""
    out = work / _key(case).replace("|", "-").replace(" ", "_").replace("(", "").replace(")", "")
    shutil.rmtree(out, ignore_errors=True)
    overrides = [
        f"data={json.dumps(str(data))}",
        f"out={json.dumps(str(out))}",
        f"model.preset='tinystories-{case['width']}'",
        f"model.n_layers={args.depth}",
        f"protocol='{case['protocol']}'",
        f"steps={case['steps']}",
        f"batch_size={args.batch_size}",
        f"context={args.context}",
        f"eval_interval={case['steps']}",
        f"checkpoint_interval={case['steps']}",
        "eval_batches=4",
        "log_interval=1",
        "progress=false",
        *case["overrides"],
    ]
    try:
        config = load_config(None, overrides)
    except ScheduleError as exc:  # the defaults refuse this schedule: that is the outcome
        return {**case, "refused": exc.code, "refusal": exc.details}
    trainer = Trainer(config)
    load, t0 = os.getloadavg()[0], time.perf_counter()
    outcome = {}
    try:
        trainer.run()
    except TrainingDiverged as exc:
        outcome["diverged"] = str(exc).split(";")[0]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    tapering = [r for r in records if r.get("grad_norm") is not None and r["step"] > config.taper_start_step]
    cs = [float(n.c) for n in tapernorms(trainer.model)]
    final = [r for r in records if r.get("final")]
    return {
        **{k: v for k, v in case.items() if k != "overrides"},
        "overrides": case["overrides"],
        "taper_start": config.taper_start_step,
        "calibration_window": config.calibration_window,
        "c_mean": sum(cs) / len(cs),
        "c_max": max(cs),
        "max_grad_norm_in_taper": max((r["grad_norm"] for r in tapering), default=None),
        "final_val_loss": final[0]["val_loss"] if final else None,
        **outcome,
        "wall_s": time.perf_counter() - t0,
        "loadavg_1min_at_start": load,
    }


def _markdown(result: dict) -> str:
    s, m = result["settings"], result["machine"]
    lines = [
        "# Stability of the default schedule (tapered training, widths 64–512, short schedules)",
        "",
        f"{m['cpu']}, {m['cores']} cores (1 torch thread), torch {m['torch']}, {result['date']}; shared machine, "
        "1-min load average at each run's start in the table. Austen corpus (`reproduce_realtext.py`), "
        f"llama depth {s['depth']}, 16 heads, {s['batch_size']} × {s['context']} tokens per step, lr 1e-3, "
        "5 % LR warm-up then cosine, grad clip 1, scale-loss weight 1; `c` calibrated at g = 1 over the default "
        "window (100 steps from scratch), then the taper to the last step. A schedule the defaults refuse is "
        "listed with its code and numbers instead of a run. The max grad norm is before clipping.",
        "",
        "| setting | protocol | width | steps | taper start | c mean | c max | max grad norm in taper | "
        "final val loss (g = 0) | wall (s) | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["runs"].values():
        if "refused" in r:
            numbers = ", ".join(f"{k} {v}" for k, v in r["refusal"].items() if k != "steps")
            lines.append(
                f"| {r['setting']} | {r['protocol']} | {r['width']} | {r['steps']} | – | | | | refused: "
                f"`{r['refused']}` ({numbers}) | | |"
            )
            continue
        end = f"**diverged**: {r['diverged']}" if "diverged" in r else f"{r['final_val_loss']:.4f}"
        grad = "–" if r["max_grad_norm_in_taper"] is None else f"{r['max_grad_norm_in_taper']:.3g}"
        lines.append(
            f"| {r['setting']} | {r['protocol']} | {r['width']} | {r['steps']} | {r['taper_start']} | "
            f"{r['c_mean']:.3g} | {r['c_max']:.3g} | {grad} | {end} | {r['wall_s']:.0f} | "
            f"{r['loadavg_1min_at_start']:.1f} |"
        )
    defaults = [r for r in result["runs"].values() if r["setting"] == "default" and "refused" not in r]
    refused = [r for r in result["runs"].values() if "refused" in r]
    lines += [
        "",
        f"Default settings: {sum('diverged' not in r for r in defaults)} of {len(defaults)} trained runs finished "
        f"at g = 0 without diverging; {len(refused)} schedules refused before training.",
    ]
    return "\n".join(lines) + "\n"


def _finished(stem: Path, settings: dict) -> dict:
    """The runs already recorded under ``stem`` with the same shape settings (others are refused, not mixed)."""
    path = stem.with_suffix(".json")
    if not path.is_file():
        return {}
    recorded = json.loads(path.read_text())
    if recorded["settings"] != settings:
        raise SystemExit(f"{path} holds runs with other settings {recorded['settings']}; move it away first")
    return recorded["runs"]


def _order(run: dict) -> tuple:
    return (
        run["setting"] != "default",
        run["setting"],
        run["steps"],
        run["width"],
        run["protocol"],
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--widths", nargs="+", type=int, default=[64, 128, 256, 512])
    p.add_argument("--lengths", nargs="+", type=int, default=[40, 100, 300, 600])
    p.add_argument(
        "--previous-at", type=int, default=300, help="run the previous defaults at the shortest length >= this"
    )
    p.add_argument("--protocols", nargs="+", default=["internal", "all"])
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--context", type=int, default=64)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work", type=Path, default=Path("out/realtext"))
    p.add_argument("--data", type=Path, help="an already prepared data directory (default: prepare the Austen corpus)")
    p.add_argument("--results", type=Path, default=Path("bench/results"))
    args = p.parse_args()
    use_threads(args.threads)
    data = args.data or prepare_corpus(args.work, "austen", args.vocab_size)
    stem = args.results / "stability_sweep"
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k in SHAPE}
    for case in _cases(args):
        if _key(case) in _finished(stem, settings):
            continue
        outcome = run_case(data, args.work / "stability", case, args)
        print(json.dumps(outcome), flush=True)
        # Re-read before writing: several sweeps (e.g. one per width) may share the results file.
        runs = {**_finished(stem, settings), _key(case): outcome}
        result = {"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
        result.update(settings=settings, runs=dict(sorted(runs.items(), key=lambda kv: _order(kv[1]))))
        stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
        stem.with_suffix(".md").write_text(_markdown(result))


if __name__ == "__main__":
    main()
