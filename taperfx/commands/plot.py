"""``taperfx plot RUN... --out DIR``: loss, schedule, scale and grad-norm figures of one or more runs."""

from __future__ import annotations

import sys

from taperfx.commands.outputs import check_output_dir


def add_arguments(p) -> None:
    p.add_argument("runs", nargs="+", help="run directories")
    p.add_argument("--out", default="plots", help="where the PNGs go")


def run(args) -> int:
    check_output_dir(args.out, "--out")
    from taperfx.train.plot import plot_runs

    figures = plot_runs(args.runs, args.out)
    for path in figures.paths:
        print(path)
    for run_dir, left_out in figures.skipped.items():
        counts = ", ".join(f"{key} {n}" for key, n in sorted(left_out.items()))
        print(f"taperfx plot: {run_dir}: not drawn, values that are not finite: {counts}", file=sys.stderr)
    return 0
