"""What the training benchmarks share: the machine description and one timed training run."""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from taperfx.benchmarks.decode import environment
from taperfx.train.checkpoint import read_meta
from taperfx.train.config import load_config
from taperfx.train.loop import TrainingDiverged, train
from taperfx.train.prepare import prepare_data


def add_shape_arguments(parser: argparse.ArgumentParser) -> None:
    """The model and batch shape every training benchmark takes, and where its results go."""
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--results", type=Path, default=Path("bench/results"))


def add_run_arguments(parser: argparse.ArgumentParser, steps: int) -> None:
    """``add_shape_arguments`` plus what a benchmark that trains whole runs needs."""
    add_shape_arguments(parser)
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=Path("out/bench"), help="data and run directories (scratch)")


def run_overrides(args: argparse.Namespace, eval_interval: int) -> list[str]:
    """The training-config overrides that ``add_run_arguments`` stand for."""
    return [
        f"model.preset='tinystories-{args.width}'",
        f"steps={args.steps}",
        f"batch_size={args.batch_size}",
        f"context={args.context}",
        f"seed={args.seed}",
        "eval_batches=8",
        f"eval_interval={eval_interval}",
        f"checkpoint_interval={args.steps}",
    ]


def use_threads(n: int) -> None:
    """Pin torch's thread count: on a shared machine, more threads than free cores makes
    some steps a hundred times slower (spinning workers), which would swamp the timings."""
    torch.set_num_threads(n)


def machine() -> dict:
    return {**environment(torch.device("cpu")), "cores": os.cpu_count()}


def ensure_data(data_dir: Path, vocab_size: int) -> Path:
    """The embedded synthetic corpus, prepared once (``prepare_data`` skips finished stages)."""
    return prepare_data(data_dir, vocab_size=vocab_size)


def timed_run(data: Path, out: Path, overrides: list[str]) -> dict:
    """Train one configuration from scratch; return its final metrics, curves and wall time."""
    config = load_config(
        None, [f"data={json.dumps(str(data))}", f"out={json.dumps(str(out))}", "progress=false", *overrides]
    )
    t0 = time.perf_counter()
    try:
        final = train(config)
    except TrainingDiverged as exc:  # a result too: record it instead of losing the other runs
        return {
            "protocol": config.protocol,
            "scale_loss_weight": config.scale_loss_weight,
            "diverged": str(exc),
            "wall_s": time.perf_counter() - t0,
        }
    wall = time.perf_counter() - t0
    meta = read_meta(final)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "logit_norm" in r]
    return {
        "protocol": config.protocol,
        "scale_loss_weight": config.scale_loss_weight,
        "final_val_loss": meta["val_loss"],
        "final_gate": meta["gate"],
        "gate_zero": meta["gate_zero"],
        "wall_s": wall,
        "curves": {k: [[r["step"], r[k]] for r in steps] for k in ("logit_norm", "prelogit_scale", "loss")},
        "val_curve": [
            [r["step"], r["val_loss"]] for r in records if r.get("val_loss") is not None and not r.get("final")
        ],
        "checkpoint": str(final),
    }
