"""``plot_runs``: PNG figures from the ``metrics.jsonl`` of one or more runs.

Four figures, each comparing runs on shared axes:

- ``loss.png``: training loss (smoothed) and validation loss at g = 0 (paper Fig. 1/2);
- ``schedule.png``: the gate and the learning rate over steps;
- ``scale.png``: mean logit norm and pre-logit scale s with its frozen target
  (logit chasing shows as growth without an anchor, docs/method.md §7);
- ``grad_norms.png``: gradient norm by weight type (paper Fig. 4).

Values that are not finite (a hand-edited or damaged ``metrics.jsonl``) are left out of
every figure and counted, so the command can say what it did not draw; a run with no
finite value to draw at all is refused.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

from taperfx.atomic import atomic_path  # noqa: E402
from taperfx.errors import DataError, InputNotFound  # noqa: E402
from taperfx.jsonfile import read_json_object  # noqa: E402
from taperfx.train.metrics import WEIGHT_TYPES, read_records  # noqa: E402

__all__ = ["Figures", "finite_records", "plot_runs", "read_run", "validation_curve"]

_WINDOW = 5  # log records per moving-average window
_PLOTTED = ("loss", "val_loss", "gate", "lr", "logit_norm", "prelogit_scale", "scale_target", "grad_norms")


@dataclass(frozen=True)
class Figures:
    paths: list[Path]
    skipped: dict[str, dict[str, int]]  # run directory -> metric -> values left out as not finite


def finite_records(records: list[dict]) -> tuple[list[dict], dict[str, int]]:
    """``records`` without their values that are not finite numbers (NaN, ±inf; grad norms too), and how many
    of each metric were left out (``grad_norms.mlp`` for a grad norm): a figure's axis limits cannot be NaN or
    inf."""
    skipped: Counter[str] = Counter()

    def finite(table: dict, prefix: str = "") -> dict:
        kept = {k: finite(v, f"{prefix}{k}.") if isinstance(v, dict) else v for k, v in table.items()}
        for key, value in table.items():
            if isinstance(value, float) and not math.isfinite(value):
                skipped[prefix + key] += 1
                del kept[key]
        return kept

    return [finite(r) for r in records], dict(skipped)


def read_run(run_dir: str | os.PathLike) -> tuple[str, list[dict]]:
    """A label for the run (name, protocol, λ) and its metric records."""
    run = Path(run_dir)
    metrics = run / "metrics.jsonl"
    if not metrics.is_file():
        raise InputNotFound(f"{run} has no metrics.jsonl; is it a taperfx train output directory?")
    records = read_records(metrics)
    if not records:
        raise DataError(f"{metrics} is empty: the run has not logged a step yet", code="empty-metrics")
    label = run.name
    if (run / "run.json").is_file():
        config = read_json_object(run / "run.json", "it only names the run in the legend: fix or delete it")
        protocol, weight = config.get("protocol"), config.get("scale_loss_weight")
        aux = f", λ={weight:g}" if protocol != "baseline" and isinstance(weight, (int, float)) else ""
        label = f"{run.name} ({protocol}{aux})" if isinstance(protocol, str) else run.name
    return label, records


def _series(records: list[dict], key: str, final: bool = False) -> tuple[list[int], list[float]]:
    """``key`` over steps; the end-of-run record (``final``, the last step's g = 0 evaluation) only if asked."""
    pairs = [(r["step"], r[key]) for r in records if r.get(key) is not None and (final or not r.get("final"))]
    return [s for s, _ in pairs], [v for _, v in pairs]


def validation_curve(records: list[dict]) -> tuple[list[int], list[float]]:
    """Validation loss over steps, ending with the end-of-run evaluation (the final, g = 0 point)."""
    return _series(records, "val_loss", final=True)


def _smoothed_loss(records: list[dict]) -> tuple[list[int], list[float]]:
    """Training loss at the regular log steps, as a centred moving average (no lag, unlike an EMA)."""
    pairs = [(r["step"], r["loss"]) for r in records if "logit_norm" in r and "loss" in r]  # the log records
    if len(pairs) < _WINDOW:
        return [s for s, _ in pairs], [v for _, v in pairs]
    values = np.convolve([v for _, v in pairs], np.ones(_WINDOW) / _WINDOW, mode="valid")
    half = _WINDOW // 2
    return [s for s, _ in pairs[half : half + len(values)]], values.tolist()


def _colors():
    return plt.rcParams["axes.prop_cycle"].by_key()["color"] * 4


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:  # the temporary keeps the .png suffix matplotlib picks the format by
            fig.savefig(tmp, dpi=120)
    finally:
        plt.close(fig)
    return path


def _loss_figure(runs, out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(13, 5.5))
    # The y range is set by the training curves: a val loss that blew up (a norm-free model
    # evaluated at g = 0 mid-taper can reach 1e20) is drawn as a marker on the top edge
    # rather than flattening every other curve. Without a finite training loss, the validation losses set it.
    train = [v for _, records in runs for v in _smoothed_loss(records)[1]]
    top = 1.05 * max(train or [v for _, records in runs for v in validation_curve(records)[1]], default=1.0)
    for color, (label, records) in zip(_colors(), runs):
        ax.plot(*_smoothed_loss(records), color=color, lw=1.5, label=f"{label} train (moving average)")
        steps, val = validation_curve(records)
        ax.plot(
            steps,
            [v if v <= top else math.nan for v in val],
            "o--",
            color=color,
            ms=4,
            lw=1,
            label=f"{label} val (g=0 if tapered)",
        )
        off = [s for s, v in zip(steps, val) if v > top]
        if off:
            ax.plot(
                off,
                [top] * len(off),
                "^",
                color=color,
                ms=8,
                clip_on=False,
                label=f"{label} val off scale (> {top:.1f})",
            )
    ax.set(xlabel="step", ylabel="cross-entropy (nats/token)", title="Loss", ylim=(0, top))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the axes: curves stay visible
    return _save(fig, out / "loss.png")


def _schedule_figure(runs, out: Path) -> Path:
    fig, (ax_gate, ax_lr) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    for color, (label, records) in zip(_colors(), runs):
        steps, gate = _series(records, "gate")
        if gate:
            ax_gate.plot(steps, gate, color=color, label=label)
        ax_lr.plot(*_series(records, "lr"), color=color, label=label)
    ax_gate.set(ylabel="gate g", title="Gate and learning rate", ylim=(-0.05, 1.05))
    ax_lr.set(xlabel="step", ylabel="learning rate")
    for ax in (ax_gate, ax_lr):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    return _save(fig, out / "schedule.png")


def _scale_figure(runs, out: Path) -> Path:
    fig, (ax_logit, ax_s) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    for color, (label, records) in zip(_colors(), runs):
        ax_logit.plot(*_series(records, "logit_norm"), color=color, label=label)
        ax_s.plot(*_series(records, "prelogit_scale"), color=color, label=f"{label}: s")
        steps, target = _series(records, "scale_target")
        if target:
            ax_s.plot(steps, target, ":", color=color, lw=2, label=f"{label}: target s*")
    ax_logit.set(ylabel="mean ‖logits‖₂ per token", title="Logit norm and pre-logit scale", yscale="log")
    ax_s.set(xlabel="step", ylabel="pre-logit scale s = r(h)", yscale="log")
    for ax in (ax_logit, ax_s):
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    return _save(fig, out / "scale.png")


def _grad_figure(runs, out: Path) -> Path:
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
    for ax, kind in zip(axes.flat, WEIGHT_TYPES):
        for color, (label, records) in zip(_colors(), runs):
            pairs = [(r["step"], r["grad_norms"][kind]) for r in records if kind in r.get("grad_norms", {})]
            ax.plot([s for s, _ in pairs], [v for _, v in pairs], color=color, lw=1, label=label)
        ax.set(title=f"{kind} weights", yscale="log", ylabel="grad L2 norm")
        ax.grid(alpha=0.3, which="both")
    for ax in axes[-1]:
        ax.set_xlabel("step")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle("Gradient norm by weight type (before clipping)")
    return _save(fig, out / "grad_norms.png")


def plot_runs(run_dirs: list[str | os.PathLike], out_dir: str | os.PathLike) -> Figures:
    """Write the four figures for ``run_dirs`` into ``out_dir``: their paths, and the values not drawn."""
    if not run_dirs:
        raise InputNotFound("plot_runs needs at least one run directory")
    runs, skipped = [], {}
    for run_dir in run_dirs:
        label, records = read_run(run_dir)
        records, left_out = finite_records(records)
        if not any(r.get(key) not in (None, {}) for r in records for key in _PLOTTED):
            raise DataError(f"{run_dir}/metrics.jsonl holds no finite value to plot", code="nothing-to-plot")
        runs.append((label, records))
        if left_out:
            skipped[str(run_dir)] = left_out
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [f(runs, out) for f in (_loss_figure, _schedule_figure, _scale_figure, _grad_figure)]
    return Figures(paths, skipped)
