"""The tiny training run the loop tests share: a 2-layer width-32 model on prepared synthetic stories.

Its schedules are far shorter than a tapered run from scratch may be by default (``schedule-too-short``,
tests/test_stability_defaults.py), so it calibrates ``c`` over one step: these tests are about the loop's
mechanics, not about stability."""

from __future__ import annotations

import json
from pathlib import Path

from taperfx.cli import main
from taperfx.train.config import TrainConfig, load_config
from taperfx.train.prepare import prepare_data

TINY = [
    "model.dim=32",
    "model.n_layers=2",
    "model.n_heads=4",
    "model.max_seq_len=32",
    "batch_size=4",
    "eval_batches=2",
    "progress=false",
    "log_interval=1",
    "calibration_steps=1",
]


def tiny_config(data, out, *overrides: str) -> TrainConfig:
    """The tiny run's config over ``data`` into ``out``, with ``overrides`` (``key=value``) applied last."""
    return load_config(None, [f"data={json.dumps(str(data))}", f"out={json.dumps(str(out))}", *TINY, *overrides])


def tiny_data(tmp_path_factory) -> Path:
    """Prepared synthetic stories for command-line runs (a module-scoped fixture's body)."""
    return prepare_data(tmp_path_factory.mktemp("data") / "d", n_stories=120, vocab_size=320)


def tiny_cli_run(data: Path, tmp_path_factory, steps: int, *settings: str) -> Path:
    """A finished Internal-Taper run of ``steps`` steps, trained by ``taperfx train`` with the tiny settings
    and ``settings`` (``key=value``, applied last)."""
    out = tmp_path_factory.mktemp("run") / "internal"
    sets = [f"--set={item}" for item in (*TINY, *settings)]
    assert main(["train", "--data", str(data), "--out", str(out), "--steps", str(steps), *sets]) == 0
    return out
