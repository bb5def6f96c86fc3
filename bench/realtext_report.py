"""The real-text reproduction's report: Table-1-style statistics, curves, figures and folded-model samples.

Reads each run's ``metrics.jsonl`` and final checkpoint; runs that have not finished are
listed as missing, so a partial grid still gives an honest report. "Flattened" means
the validation loss changed by less than 1 % over the last 20 % of the steps.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import statistics
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from _runs import machine  # noqa: E402

from taperfx.cli import main as taperfx_cli  # noqa: E402
from taperfx.train.checkpoint import list_checkpoints, read_meta  # noqa: E402

FLAT_TOLERANCE = 0.01  # relative change over the last FLAT_WINDOW of the steps
FLAT_WINDOW = 0.2
PROMPT = "It is a truth universally acknowledged"
PAPER_W64 = {"baseline": 2.1538, "internal": 2.1852, "all": 2.1930}  # TinyStories, 6 seeds (docs/method.md §9)


def finished(run: Path) -> bool:
    """Whether ``run`` ended (its last checkpoint is final) or diverged (recorded in ``diverged.json``)."""
    found = list_checkpoints(run) if run.is_dir() else []
    return (run / "diverged.json").is_file() or bool(found and read_meta(found[-1])["final"])


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _value_at(curve: list[list[float]], step: float) -> float:
    """The curve's value at the last point at or before ``step``."""
    return [v for s, v in curve if s <= step][-1]


def _sample(run: Path, tokens: int) -> str:
    """Text from the folded final model via ``taperfx generate`` (ONNX export folds a gate-0 model); cached."""
    cached = run / "sample.txt"
    if not cached.is_file():
        command = ["generate", str(run), "--prompt", PROMPT, "--backend", "onnx", "--max-new-tokens", str(tokens)]
        text = io.StringIO()
        with contextlib.redirect_stdout(text):
            failed = taperfx_cli([*command, "--temperature", "0.8", "--top-k", "40", "--seed", "1"])
        if failed:
            raise RuntimeError(f"`taperfx generate` failed on {run}")
        cached.write_text(PROMPT + text.getvalue().rstrip("\n"))
    return cached.read_text()


def _tracks_from(val: list[list[float]], live: list[list[float]]) -> float | None:
    """The first eval step from which the g = 0 network's val loss stays within 1 % of the live network's."""
    live = dict(map(tuple, live))
    close = [step for step, v in val if step in live and math.isfinite(v) and abs(v / live[step] - 1) < 0.01]
    later = [step for step, v in val if step in live and step not in close]
    return min((st for st in close if all(o < st for o in later)), default=None)


def run_summary(run: Path, steps: int) -> dict:
    """One run's final loss (tapered: at g = 0), flatness, curves and whether it folded to gate 0."""
    if (run / "diverged.json").is_file():
        return json.loads((run / "diverged.json").read_text())
    final_ckpt = list_checkpoints(run)[-1]
    meta = read_meta(final_ckpt)
    records = _records(run)
    val = [[r["step"], r["val_loss"]] for r in records if r.get("val_loss") is not None and not r.get("final")]
    live = [[r["step"], r["val_loss_live"]] for r in records if "val_loss_live" in r and not r.get("final")]
    final = meta["val_loss"]
    val.append([steps, final])
    live.append([steps, final])
    # Flatness of the network being trained (the live gate; for a baseline the same curve): the g = 0
    # network of a tapered run is a different model until the gate is small, and its change says so.
    earlier = _value_at(live, (1 - FLAT_WINDOW) * steps)
    logged = [r for r in records if "logit_norm" in r]
    return {
        "final_val_loss": final,
        "gate_zero": meta["gate_zero"],
        "change_last_20pct": (earlier - final) / earlier,
        "gate0_tracks_from": _tracks_from(val, live),
        "val_curve": val,
        "val_live_curve": live,
        "curves": {
            k: [[r["step"], r[k]] for r in logged if r.get(k) is not None]
            for k in ("logit_norm", "prelogit_scale", "scale_target", "gate", "loss")
        },
    }


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def variant_table(summaries: dict) -> dict:
    """Per variant: seeds done, mean ± std of the final val loss, relative gap of the mean to the baseline's."""
    table = {}
    for variant in dict.fromkeys(v for v, _ in summaries):
        done = [s for (v, _), s in summaries.items() if v == variant and s and "final_val_loss" in s]
        diverged = sum(1 for (v, _), s in summaries.items() if v == variant and s and "diverged" in s)
        if done:
            mean, std = _mean_std([s["final_val_loss"] for s in done])
            flat = max(abs(s["change_last_20pct"]) for s in done)
            table[variant] = {"seeds": len(done), "diverged": diverged, "mean": mean, "std": std, "max_change": flat}
    base = table.get("baseline", {}).get("mean")
    for row in table.values():
        row["gap_pct"] = None if base is None else 100 * (row["mean"] / base - 1)
    return table


def crossings(summaries: dict) -> dict:
    """Per tapered variant: the live-gate val gap to the baseline at every eval step, averaged over the seeds both
    finished (a seed-matched comparison), and the steps after which its sign flips."""

    def curve(variant, seed):
        s = summaries.get((variant, seed))
        return dict(map(tuple, s["val_live_curve"])) if s and "val_live_curve" in s else None

    out = {}
    for variant in dict.fromkeys(v for v, _ in summaries):
        pairs = [(curve(variant, sd), curve("baseline", sd)) for v, sd in summaries if v == variant]
        pairs = [(c, b) for c, b in pairs if c is not None and b is not None]
        if variant == "baseline" or not pairs:
            continue
        steps = sorted(set.intersection(*[set(c) & set(b) for c, b in pairs]))
        gap = [[st, statistics.fmean(c[st] - b[st] for c, b in pairs)] for st in steps]
        flips = [b[0] for a, b in zip(gap, gap[1:]) if (a[1] < 0) != (b[1] < 0)]
        out[variant] = {"seeds": len(pairs), "gap_live": gap, "sign_flips_at": flips}
    return out


def _figures(summaries: dict, folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    colors = {
        "baseline": "k",
        "baseline+scale": "tab:gray",
        "internal": "tab:blue",
        "all": "tab:red",
        "internal-noaux": "tab:cyan",
        "all-noaux": "tab:orange",
    }
    done = {k: s for k, s in summaries.items() if s and "val_curve" in s}
    fig, ax = plt.subplots(figsize=(8, 5))
    for (variant, seed), s in done.items():
        steps, values = zip(*s["val_live_curve"])
        ax.plot(
            steps,
            values,
            color=colors[variant],
            alpha=0.7,
            label=variant if seed == min(sd for v, sd in done if v == variant) else None,
        )
    ax.set(xlabel="step", ylabel="validation loss (live gate; final point at g = 0)")
    ax.legend()
    ax.grid(alpha=0.3)
    paths = [folder / "val_curves.png"]
    fig.savefig(paths[0], dpi=120, bbox_inches="tight")
    plt.close(fig)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for (variant, seed), s in done.items():
        if seed != min(sd for v, sd in done if v == variant):
            continue
        for ax, key in zip(axes, ("logit_norm", "prelogit_scale")):
            steps, values = zip(*s["curves"][key])
            ax.plot(steps, values, color=colors[variant], label=variant)
    axes[0].set(xlabel="step", ylabel="mean logit norm", yscale="log")
    axes[1].set(xlabel="step", ylabel="pre-logit scale r(h) (final norm's input)", yscale="log")
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    paths.append(folder / "logit_chasing.png")
    fig.savefig(paths[1], dpi=120, bbox_inches="tight")
    plt.close(fig)
    return paths


def _markdown(result: dict) -> str:
    s, m = result["settings"], result["machine"]
    lines = [
        f"# Real-text reproduction: {result['corpus']}, width {s['width']}, depth {s['depth']}",
        "",
        f"{m['cpu']}, {m['cores']} cores ({s['threads']} torch thread), torch {m['torch']}, {result['date']}, "
        f"load average at report time {result['loadavg'][0]:.2f} (shared machine). llama, {s['depth']} layers, "
        f"16 heads, width {s['width']}, vocab {result['vocab_size']} (SentencePiece via `taperfx data prepare`, "
        f"held-out split as prepared: {result['val_tokens']} val tokens), {s['steps']} steps × {s['batch_size']} × "
        f"{s['context']} tokens, AdamW lr {s['lr']}, default schedule (5 % LR warm-up, cosine to 0; taper from "
        "the later of warm-up end and calibration end to the last step), scale-loss weight 1. Final val loss of "
        "tapered models at g = 0. Flattened: < 1 % change of the trained (live-gate) network's val loss over the "
        "last 20 % of steps.",
        "",
        "| variant | seeds | val loss (mean ± std) | gap to baseline | max change over last 20 % | diverged |",
        "|---|---|---|---|---|---|",
    ]
    for variant, row in result["table"].items():
        gap = "–" if variant == "baseline" or row["gap_pct"] is None else f"{row['gap_pct']:+.2f} %"
        lines.append(
            f"| {variant} | {row['seeds']} | {row['mean']:.4f} ± {row['std']:.4f} | {gap} | "
            f"{100 * row['max_change']:.2f} % | {row['diverged']} |"
        )
    lines += [
        "",
        "Per run (g = 0 tracks: the first evaluation from which the g = 0 network's val loss stays within 1 % of the "
        "live network's):",
        "",
        "| run | final val loss | change over last 20 % | gate 0 | g = 0 tracks from step |",
        "|---|---|---|---|---|",
    ]
    for key, r in result["runs"].items():
        if r is None:
            lines.append(f"| {key} | not finished | | | |")
        elif "diverged" in r:
            lines.append(f"| {key} | diverged: {r['diverged'].split(';')[0]} | | | |")
        else:
            tracks = r.get("gate0_tracks_from") if r["gate_zero"] else None
            lines.append(
                f"| {key} | {r['final_val_loss']:.4f} | {100 * r['change_last_20pct']:.2f} % | {r['gate_zero']} | "
                f"{'–' if tracks is None else tracks} |"
            )
    lines += ["", "Live-gate val-loss gap to the baseline of the same seed, mean over seeds (negative: ahead):", ""]
    for variant, c in result["crossings"].items():
        points = ", ".join(f"{st}: {g:+.3f}" for st, g in c["gap_live"])
        lines.append(
            f"- {variant} ({c['seeds']} seeds): {points}; sign flips after steps {c['sign_flips_at'] or 'none'}"
        )
    lines += ["", "Samples from the folded models (`taperfx generate --backend onnx`, T 0.8, top-k 40):", ""]
    for key, text in result["samples"].items():
        lines.append(f"- {key}: {text!r}")
    lines += ["", "Figures: " + ", ".join(f"`{result['name']}/{Path(p).name}`" for p in result["figures"])]
    return "\n".join(lines) + "\n"


def write_report(args, data: Path, name: str, runs: dict) -> Path:
    """Summarise every finished run in ``runs`` ((variant, seed) -> run dir); write JSON, markdown and figures."""
    summaries = {key: run_summary(run, args.steps) if finished(run) else None for key, run in runs.items()}
    samples = {}
    if args.samples:
        for variant in dict.fromkeys(v for v, _ in runs):
            first = next((runs[k] for k, s in summaries.items() if k[0] == variant and s and "val_curve" in s), None)
            if first is not None:
                samples[f"{variant} ({first.name})"] = _sample(first, args.samples)
    meta = json.loads((data / "meta.json").read_text())
    result = {
        "name": name,
        "corpus": args.corpus if args.text is None else str(args.text),
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "loadavg": os.getloadavg(),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "vocab_size": meta["vocab_size"],
        "val_tokens": meta["tokens"]["val"],
        "paper_w64": PAPER_W64,
        "table": variant_table(summaries),
        "crossings": crossings(summaries),
        "runs": {f"{v}-s{s}": summary for (v, s), summary in summaries.items()},
        "samples": samples,
        "figures": [str(p) for p in _figures(summaries, args.results / name)],
    }
    stem = args.results / name
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    stem.with_suffix(".md").write_text(_markdown(result))
    return stem.with_suffix(".md")
