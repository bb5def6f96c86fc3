"""``taperfx plot RUN... --out DIR``: loss, schedule, scale and grad-norm figures of one or more runs."""

from __future__ import annotations

from taperfx.commands.outputs import check_output_dir


def add_arguments(p) -> None:
    p.add_argument("runs", nargs="+", help="run directories")
    p.add_argument("--out", default="plots", help="where the PNGs go")


def run(args) -> int:
    check_output_dir(args.out, "--out")
    from taperfx.train.plot import plot_runs

    for path in plot_runs(args.runs, args.out):
        print(path)
    return 0
