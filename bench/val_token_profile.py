"""Per-token validation loss of finished runs: is a mean val loss driven by a few tokens?

A norm-free model (All-Taper at g = 0) has nothing that bounds the scale of one
token's residual stream, so a rare input can give logits with a norm in the tens of
thousands and a loss of hundreds of nats on that token, which then dominates the
mean. This script reports the distribution (mean, median, 99.9th percentile, max,
share of tokens above 10 nats) and the largest logit norm, on the same fixed
validation windows the trainer uses. Results: bench/results/{name}.{json,md}.

    .venv/bin/python bench/val_token_profile.py out/bench/reproduction_w64/* --name val_token_profile_w64
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _runs import machine, use_threads

from taperfx.train.checkpoint import load_model
from taperfx.train.tokens import open_data


@torch.no_grad()
def profile(run: Path, data_dir: Path, batches: int) -> dict:
    model, meta = load_model(run)
    train = meta["train"]
    stream = open_data(data_dir).stream("val", train["context"])
    losses, norms = [], []
    for x, y in stream.evaluation_batches(train["batch_size"], batches):
        logits, _ = model(x)
        losses.append(F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none"))
        norms.append(logits.norm(dim=-1).flatten())
    loss, norm = torch.cat(losses), torch.cat(norms)
    return {
        "protocol": meta["protocol"],
        "scale_loss_weight": train["scale_loss_weight"],
        "gate": meta["gate"],
        "tokens": loss.numel(),
        "mean": loss.mean().item(),
        "median": loss.median().item(),
        "p99_9": loss.quantile(0.999).item(),
        "max": loss.max().item(),
        "share_above_10_nats": (loss > 10).float().mean().item(),
        "max_logit_norm": norm.max().item(),
        "median_logit_norm": norm.median().item(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", type=Path, nargs="+")
    p.add_argument("--data", type=Path, default=Path("out/bench/data"))
    p.add_argument("--batches", type=int, default=8, help="evaluation batches (the trainer's eval_batches)")
    p.add_argument("--name", default="val_token_profile")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--results", type=Path, default=Path("bench/results"))
    args = p.parse_args()
    use_threads(args.threads)

    rows = {run.name: profile(run, args.data, args.batches) for run in args.runs}
    result = {"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M"), "runs": rows}
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    m = result["machine"]
    lines = [
        "# Per-token validation loss of the final checkpoints",
        "",
        f"{m['cpu']}, torch {m['torch']}, {result['date']}. Same fixed windows as the trainer's evaluation; "
        "tapered models at g = 0.",
        "",
        "| run | tokens | mean | median | 99.9th pct | max | share > 10 nats | median / max logit norm |",
        "|---|---|---|---|---|---|---|---|",
        *(
            f"| {name} | {r['tokens']} | {r['mean']:.4f} | {r['median']:.4f} | {r['p99_9']:.2f} | {r['max']:.1f} | "
            f"{100 * r['share_above_10_nats']:.3f} % | {r['median_logit_norm']:.0f} / {r['max_logit_norm']:.0f} |"
            for name, r in rows.items()
        ),
    ]
    (args.results / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
