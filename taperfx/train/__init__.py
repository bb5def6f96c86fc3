"""Taper training: corpus → tokenizer and token streams → training loop → gate-zero checkpoint.

Python entry points (the CLI is a thin layer over them)::

    from taperfx.train import prepare_data, load_config, train, load_model
    data = prepare_data("data/default")                      # embedded synthetic corpus
    config = load_config(None, [f"data='{data}'", "out='runs/internal'", "steps=500"])
    checkpoint = train(config)                               # final checkpoint directory, gate 0
    model, meta = load_model(checkpoint)

Figures: ``taperfx.train.plot.plot_runs`` (kept out of this namespace: it imports matplotlib).
"""

from taperfx.train.checkpoint import load_model, read_meta
from taperfx.train.config import TrainConfig, load_config
from taperfx.train.loop import Trainer, TrainingDiverged, train
from taperfx.train.prepare import prepare_data

__all__ = [
    "prepare_data",
    "TrainConfig",
    "load_config",
    "Trainer",
    "TrainingDiverged",
    "train",
    "load_model",
    "read_meta",
]
