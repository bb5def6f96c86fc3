"""The tiny training run the loop tests share: a 2-layer width-32 model on prepared synthetic stories.

Its schedules are far shorter than a tapered run from scratch may be by default (``schedule-too-short``,
tests/test_stability_defaults.py), so it calibrates ``c`` over one step: these tests are about the loop's
mechanics, not about stability."""

from __future__ import annotations

import json

from taperfx.train.config import TrainConfig, load_config

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
