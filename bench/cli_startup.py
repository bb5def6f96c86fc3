"""How long ``taperfx --help`` and ``taperfx COMMAND --help`` take, in fresh processes, interleaved.

The command line imports a command's module only when that command runs, so help and
argument errors should not pay for torch, onnx or matplotlib. ``--before DIR`` adds the
same commands run from another checkout's ``taperfx`` (for example the commit before
the lazy command table: ``git archive 7419212 taperfx | tar -x -C /tmp/before``).

    python bench/cli_startup.py --before /tmp/before --repeats 7

Writes ``bench/results/cli_startup.json`` and ``.md`` (machine, versions, date, load).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = (["--help"], ["train", "--help"], ["fold", "--help"], ["export", "onnx", "--help"])


def _time(tree: Path, argv: list[str]) -> float:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    start = time.perf_counter()
    # cwd too: `python -m` puts the working directory first on sys.path, before PYTHONPATH
    subprocess.run([sys.executable, "-m", "taperfx.cli", *argv], env=env, cwd=tree, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, help="a directory holding an older taperfx package to compare")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    trees = {"this tree": ROOT, **({"before": args.before} if args.before else {})}
    for tree in trees.values():  # warm the file cache once, untimed
        _time(tree, ["--help"])
    samples: dict[tuple[str, str], list[float]] = {}
    loads = [os.getloadavg()[0]]
    for _ in range(args.repeats):  # interleaved: every variant once per round
        for name, tree in trees.items():
            for argv in COMMANDS:
                samples.setdefault((name, " ".join(argv)), []).append(_time(tree, argv))
        loads.append(os.getloadavg()[0])
    import torch

    rows = [
        {"tree": tree, "command": f"taperfx {cmd}", "median_s": statistics.median(v), "min_s": min(v), "max_s": max(v)}
        for (tree, cmd), v in samples.items()
    ]
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "repeats": args.repeats,
        "loadavg_1min": {"min": min(loads), "max": max(loads)},
        "results": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cli_startup.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# CLI start-up ({result['date']}; {result['machine']}; Python {result['python']}, torch {result['torch']})",
        "",
        f"Fresh process per call, {args.repeats} interleaved rounds; 1-min load average "
        f"{min(loads):.1f}–{max(loads):.1f} (a shared machine: compare rows of one round, not absolute numbers).",
        "",
        "| tree | command | median s | min s | max s |",
        "|---|---|---|---|---|",
        *[
            f"| {r['tree']} | `{r['command']}` | {r['median_s']:.2f} | {r['min_s']:.2f} | {r['max_s']:.2f} |"
            for r in rows
        ],
    ]
    (args.out / "cli_startup.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
