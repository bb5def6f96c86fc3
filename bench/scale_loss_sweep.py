"""Choose the default scale-loss weight λ (docs/method.md §7: the paper's value was lost).

All-Taper runs (the protocol that depends on the anchor) that differ only in λ, on
the embedded synthetic corpus. Reports the val loss at g = 0 and the logit norm at
the end; results go to bench/results/scale_loss_sweep.{json,md}.

    .venv/bin/python bench/scale_loss_sweep.py --steps 200 --lambdas 0 0.1 1 10 100
"""

from __future__ import annotations

import argparse
import json
import shutil
import time

from _runs import add_run_arguments, ensure_data, machine, run_overrides, timed_run, use_threads


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lambdas", type=float, nargs="+", default=[0.0, 0.1, 1.0, 10.0, 100.0])
    add_run_arguments(p, steps=200)
    args = p.parse_args()

    use_threads(args.threads)
    data = ensure_data(args.work / "data", args.vocab_size)
    common = [*run_overrides(args, eval_interval=args.steps), "protocol='all'"]
    runs = {}
    for lam in args.lambdas:
        out = args.work / "sweep" / f"all-lambda-{lam:g}"
        shutil.rmtree(out, ignore_errors=True)
        runs[f"{lam:g}"] = timed_run(data, out, [*common, f"scale_loss_weight={lam}"])
        print(f"λ={lam:g}: val loss {runs[f'{lam:g}']['final_val_loss']:.4f}", flush=True)

    result = {
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "settings": vars(args) | {"work": str(args.work), "results": str(args.results)},
        "runs": runs,
    }
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "scale_loss_sweep.json").write_text(json.dumps(result, indent=2) + "\n")
    m = result["machine"]
    lines = [
        "# Scale-loss weight sweep (All-Taper, synthetic corpus)",
        "",
        f"{m['cpu']}, {m['cores']} cores, torch {m['torch']}, {result['date']}. Width {args.width}, depth 8, "
        f"{args.steps} steps × {args.batch_size} × {args.context} tokens, seed {args.seed}, one seed per λ.",
        "",
        "| λ | val loss at g=0 | final logit norm | final pre-logit scale s | wall (s) |",
        "|---|---|---|---|---|",
    ]
    for lam, r in runs.items():
        lines.append(
            f"| {lam} | {r['final_val_loss']:.4f} | {r['curves']['logit_norm'][-1][1]:.2f} | "
            f"{r['curves']['prelogit_scale'][-1][1]:.4f} | {r['wall_s']:.0f} |"
        )
    (args.results / "scale_loss_sweep.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
