"""``TrainConfig``: every knob of a training run, from a TOML file plus ``key=value`` overrides.

A config file is flat TOML with one ``[model]`` table (a ``preset`` name and/or any
``ModelConfig`` field)::

    data = "data/default"
    out = "runs/internal"
    protocol = "internal"
    steps = 2000
    [model]
    preset = "tinystories-64"

Overrides use the same keys (``model.dim=128``) and TOML values (``betas=[0.9, 0.99]``);
a value TOML cannot parse is taken as a string (``protocol=all``). The vocabulary
size always comes from the prepared data's tokenizer.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from taperfx._config import DictConfig
from taperfx.models import ModelConfig, preset
from taperfx.schedule import calibration_window, check_taper_start
from taperfx.train.checkpoint import PROTOCOLS

__all__ = ["TrainConfig", "load_config"]


@dataclass
class TrainConfig(DictConfig):
    config_kind: ClassVar[str] = "training config"

    data: str = "data/default"
    out: str = "runs/default"
    model: dict = field(default_factory=lambda: {"preset": "tinystories-64"})
    init_from: str | None = None  # "hf:PATH": fine-tune a local transformers checkpoint instead of [model]
    protocol: str = "internal"  # baseline | internal | all (SPEC §6)
    scale_loss_weight: float = 1.0  # λ of SPEC §7 (lost in the paper; chosen by bench/scale_loss_sweep.py); 0 = off
    scale_loss_on_baseline: bool = False  # baseline only: the same scale loss on its final norm's input (ablation)
    steps: int = 2000  # optimizer steps
    batch_size: int = 32  # sequences per micro-batch and rank
    grad_accum: int = 1  # micro-batches per optimizer step
    batch_tokens: int | None = None  # global tokens per optimizer step; when set, it decides grad_accum
    context: int | None = None  # tokens per sequence; default: the model's max_seq_len
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    warmup_frac: float = 0.05  # linear LR warmup, then cosine to zero
    taper_start: int | None = None  # default: the later of LR warmup end and calibration end
    calibration_steps: int = 20  # g = 1 steps that calibrate c before the taper (runs < 80 steps: a quarter)
    taper_end: int | None = None  # default: the last step (trained at g = 0)
    calibration_alpha: float = 0.01  # EMA weight α of c and of the scale target (SPEC §4, §7)
    grad_clip: float = 1.0  # global grad-norm clip; 0 disables
    eval_interval: int = 200
    eval_batches: int = 20
    log_interval: int = 10
    checkpoint_interval: int = 500
    keep_last: int = 3
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    compile: bool = False  # torch.compile the model
    progress: bool = True

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {self.protocol!r}")
        for name in (
            "steps",
            "batch_size",
            "grad_accum",
            "eval_interval",
            "eval_batches",
            "log_interval",
            "checkpoint_interval",
            "keep_last",
            "calibration_steps",
        ):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("lr", "scale_loss_weight", "weight_decay", "grad_clip"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        if self.batch_tokens is not None and int(self.batch_tokens) <= 0:
            raise ValueError(f"batch_tokens must be positive, got {self.batch_tokens}")
        if not 0.0 <= self.warmup_frac < 1.0:
            raise ValueError(f"warmup_frac must lie in [0, 1), got {self.warmup_frac}")
        if not 0.0 < self.calibration_alpha <= 1.0:
            raise ValueError(f"calibration_alpha must lie in (0, 1], got {self.calibration_alpha}")
        if not (0 <= self.taper_start_step <= self.taper_end_step <= self.steps):
            raise ValueError(
                f"need 0 <= taper_start ({self.taper_start_step}) <= taper_end ({self.taper_end_step}) "
                f"<= steps ({self.steps})"
            )
        if self.scale_loss_on_baseline and self.protocol != "baseline":
            raise ValueError("scale_loss_on_baseline applies to protocol 'baseline'; tapered protocols use the loss")
        if self.anchored:
            check_taper_start(self.taper_start_step, self.calibration_window)

    @property
    def warmup_steps(self) -> int:
        return int(self.warmup_frac * self.steps)

    @property
    def anchored(self) -> bool:
        """Whether the run freezes calibrated statistics (c and/or the scale target) at ``taper_start_step``."""
        return self.protocol != "baseline" or self.scale_loss_on_baseline

    @property
    def calibration_window(self) -> int:
        return calibration_window(self.steps, self.calibration_steps)

    @property
    def taper_start_step(self) -> int:
        if self.taper_start is None:
            return max(self.warmup_steps, self.calibration_window)
        return int(self.taper_start)

    @property
    def taper_end_step(self) -> int:
        return self.steps - 1 if self.taper_end is None else int(self.taper_end)

    def model_config(self, vocab_size: int) -> ModelConfig:
        """The model to train: the preset (if any) with the ``[model]`` fields and the data's vocabulary."""
        if self.init_from is not None:
            from taperfx.hf.source import HFSource  # the optional hf extra, needed only here

            return HFSource.parse(self.init_from, vocab_size)
        fields = dict(self.model)
        name = fields.pop("preset", None)
        fields["vocab_size"] = vocab_size
        return preset(name, **fields) if name else ModelConfig.from_dict(fields)

    def seq_len(self, model: ModelConfig) -> int:
        context = model.max_seq_len if self.context is None else int(self.context)
        if not 0 < context <= model.max_seq_len:
            raise ValueError(f"context must lie in [1, max_seq_len={model.max_seq_len}], got {context}")
        return context

    def with_accumulation(self, context: int, world: int) -> "TrainConfig":
        """This config with ``grad_accum`` rounded up so a step sees ``batch_tokens`` tokens across ``world`` ranks."""
        if self.batch_tokens is None:
            return self
        per_micro_batch = self.batch_size * context * world
        return dataclasses.replace(self, grad_accum=math.ceil(self.batch_tokens / per_micro_batch))


def _parse_value(text: str):
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def load_config(
    path: str | os.PathLike | None = None, overrides: list[str] = (), base: dict | None = None
) -> TrainConfig:
    """A ``TrainConfig`` from ``base`` (a saved ``to_dict()``), else a TOML file (optional), with
    ``key=value`` overrides applied in order."""
    values: dict = dict(base or {})
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        try:
            values = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"config file {path} is not valid TOML: {exc}") from exc
    values["model"] = dict(values.get("model", {"preset": "tinystories-64"}))
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"override {item!r} is not of the form key=value")
        key = key.strip()
        if key.startswith("model."):
            values["model"][key.removeprefix("model.")] = _parse_value(text)
        else:
            values[key] = _parse_value(text)
    return TrainConfig.from_dict(values)
