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
import json
import math
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from taperfx._config import DictConfig, check_fields
from taperfx.errors import BadInput, DataError, InputNotFound
from taperfx.models import PRESETS, HFSource, ModelConfig, ModelSource, preset
from taperfx.schedule import calibration_window, check_taper_length, check_taper_start
from taperfx.train.checkpoint import PROTOCOLS

__all__ = ["TrainConfig", "RunPlan", "load_config"]

# Keys a resumed run may change: they do not affect what is computed.
_RESUMABLE_CHANGES = frozenset({"out", "data", "device", "compile", "progress"})


@dataclass
class TrainConfig(DictConfig):
    config_kind: ClassVar[str] = "training config"

    data: str = "data/default"
    out: str = "runs/default"
    model: dict = field(default_factory=lambda: {"preset": "tinystories-64"})
    init_from: str | None = None  # "hf:PATH": fine-tune a local transformers checkpoint instead of [model]
    protocol: str = "internal"  # baseline | internal | all (docs/method.md §6)
    scale_loss_weight: float = 1.0  # λ, docs/method.md §7 (lost in the paper; bench/scale_loss_sweep.py); 0 = off
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
    # g = 1 steps that calibrate c before the taper; default 100 from scratch, 20 fine-tuning (taperfx/schedule.py)
    calibration_steps: int | None = None
    taper_end: int | None = None  # default: the last step (trained at g = 0)
    calibration_alpha: float = 0.01  # EMA weight α of c and of the scale target (docs/method.md §4, §7)
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
        """Every field's type and range, checked once here, before anything is written (errors name the key)."""
        values = check_fields(type(self), {f.name: getattr(self, f.name) for f in dataclasses.fields(self)})
        for name, value in values.items():
            object.__setattr__(self, name, value)
        self.model = self._checked_model(self.model)
        if self.protocol not in PROTOCOLS:
            raise BadInput(f"protocol={self.protocol!r}: expected one of {PROTOCOLS}", code="config-choice")
        for name in (
            "steps",
            "batch_size",
            "grad_accum",
            "eval_interval",
            "eval_batches",
            "log_interval",
            "checkpoint_interval",
            "keep_last",
        ):
            _require(getattr(self, name) > 0, name, getattr(self, name), "a positive integer")
        _require(
            self.calibration_steps is None or self.calibration_steps > 0,
            "calibration_steps",
            self.calibration_steps,
            "a positive integer",
        )
        for name in ("lr", "scale_loss_weight", "weight_decay", "grad_clip"):
            _require(getattr(self, name) >= 0, name, getattr(self, name), "a finite number >= 0")
        _require(self.lr > 0, "lr", self.lr, "a number > 0")
        for name in ("batch_tokens", "context", "taper_start", "taper_end"):
            value = getattr(self, name)
            _require(value is None or value > (0 if name != "taper_start" else -1), name, value, "a positive integer")
        _require(all(0.0 <= b < 1.0 for b in self.betas), "betas", list(self.betas), "two numbers in [0, 1)")
        _require(0.0 <= self.warmup_frac < 1.0, "warmup_frac", self.warmup_frac, "a number in [0, 1)")
        _require(0.0 < self.calibration_alpha <= 1.0, "calibration_alpha", self.calibration_alpha, "a number in (0, 1]")
        if self.protocol != "baseline" and self.calibration_steps is None and self.init_from is None:
            check_taper_length(self.steps, self.taper_start_step, self.taper_end_step)
        if not (0 <= self.taper_start_step <= self.taper_end_step <= self.steps):
            raise BadInput(
                f"need 0 <= taper_start ({self.taper_start_step}) <= taper_end ({self.taper_end_step}) "
                f"<= steps ({self.steps})",
                code="config-range",
            )
        if self.scale_loss_on_baseline and self.protocol != "baseline":
            raise BadInput(
                "scale_loss_on_baseline=true: applies to protocol 'baseline' (tapered protocols use the loss)",
                code="config-choice",
            )
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise BadInput(f"device={self.device!r}: expected auto, cpu, cuda or cuda:N", code="config-choice")
        if self.anchored:
            check_taper_start(self.taper_start_step, self.calibration_window)
        if self.init_from is not None and not self.init_from.startswith("hf:"):
            raise BadInput(f"init_from={self.init_from!r}: expected hf:PATH", code="config-type")

    @staticmethod
    def _checked_model(model: dict) -> dict:
        """The ``[model]`` table checked against ``ModelConfig`` (types, ranges, and a known preset)."""
        fields = dict(model)
        name = fields.pop("preset", None)
        if name is not None and name not in PRESETS:
            raise BadInput(f"model.preset={name!r}: expected one of {sorted(PRESETS)}", code="config-choice")
        if "vocab_size" in fields:
            raise BadInput(
                "model.vocab_size: the vocabulary size comes from the prepared data's tokenizer; leave it out",
                code="config-unknown-key",
            )
        fields = check_fields(ModelConfig, fields, prefix="model.")
        try:
            (preset(name, **fields) if name else ModelConfig(**fields)).replace(vocab_size=1)
        except ValueError as exc:
            raise BadInput(f"[model]: {exc}", code="config-range") from None
        return {**({"preset": name} if name is not None else {}), **fields}

    @property
    def warmup_steps(self) -> int:
        return int(self.warmup_frac * self.steps)

    @property
    def anchored(self) -> bool:
        """Whether the run freezes calibrated statistics (c and/or the scale target) at ``taper_start_step``."""
        return self.protocol != "baseline" or self.scale_loss_on_baseline

    @property
    def calibration_window(self) -> int:
        return calibration_window(
            self.steps,
            self.calibration_steps,
            from_scratch=self.init_from is None,
            tapered=self.protocol != "baseline",
        )

    @property
    def taper_start_step(self) -> int:
        if self.taper_start is None:
            return max(self.warmup_steps, self.calibration_window)
        return int(self.taper_start)

    @property
    def taper_end_step(self) -> int:
        return self.steps - 1 if self.taper_end is None else int(self.taper_end)

    def model_config(self, vocab_size: int) -> ModelSource:
        """The model to train: ``init_from``'s Hugging Face checkpoint, else the preset (if any) with the
        ``[model]`` fields; either way it must embed the data's ``vocab_size`` tokens."""
        if self.init_from is not None:
            return HFSource.parse(self.init_from, vocab_size)
        fields = dict(self.model)
        name = fields.pop("preset", None)
        fields["vocab_size"] = vocab_size
        return preset(name, **fields) if name else ModelConfig.from_dict(fields)

    def seq_len(self, model: ModelSource) -> int:
        context = model.max_seq_len if self.context is None else int(self.context)
        if not 0 < context <= model.max_seq_len:
            raise BadInput(
                f"context={context}: expected an integer in [1, max_seq_len={model.max_seq_len}]", code="config-range"
            )
        return context

    def plan(self, vocab_size: int, world: int) -> "RunPlan":
        """What this config means for data of ``vocab_size`` tokens and ``world`` processes, decided once."""
        source = self.model_config(vocab_size)
        context = self.seq_len(source)
        return RunPlan(self.with_accumulation(context, world), source, context, world)

    def with_accumulation(self, context: int, world: int) -> "TrainConfig":
        """This config with ``grad_accum`` rounded up so a step sees ``batch_tokens`` tokens across ``world`` ranks."""
        if self.batch_tokens is None:
            return self
        per_micro_batch = self.batch_size * context * world
        return dataclasses.replace(self, grad_accum=math.ceil(self.batch_tokens / per_micro_batch))

    def resume_conflicts(self, saved: dict) -> list[str]:
        """The keys whose values differ from ``saved`` (a checkpoint's ``train`` record) and would change what a
        resumed run computes; empty when the run may continue."""
        ours = self.to_dict()
        return sorted(
            k for k in ours if k not in _RESUMABLE_CHANGES and saved.get(k) != json.loads(json.dumps(ours[k]))
        )


@dataclass(frozen=True)
class RunPlan:
    """A config resolved against its data and process count: the effective config (``grad_accum`` set by
    ``batch_tokens``), the model source and the context length; the trainer builds from this alone."""

    config: TrainConfig
    source: ModelSource
    context: int
    world: int

    @property
    def tokens_per_step(self) -> int:
        """Tokens one optimizer step sees across all processes."""
        return self.config.batch_size * self.context * self.config.grad_accum * self.world


def _require(ok: bool, key: str, value, expected: str) -> None:
    if not ok:
        raise BadInput(f"{key}={value!r}: expected {expected}", code="config-range")


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
            raise InputNotFound(f"config file {path} does not exist")
        try:
            values = tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise DataError(f"config file {path} is not valid TOML: {exc}", code="bad-toml") from exc
    model = values.get("model", {"preset": "tinystories-64"})
    if not isinstance(model, dict):
        raise BadInput(
            f"model={model!r}: expected a table ([model] in TOML, model.KEY=VALUE with --set)", "config-type"
        )
    values["model"] = dict(model)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise BadInput(f"--set {item!r}: expected KEY=VALUE", code="config-syntax")
        key = key.strip()
        if key.startswith("model."):
            values["model"][key.removeprefix("model.")] = _parse_value(text)
        elif "." in key:
            raise BadInput(f"--set {item!r}: only [model] keys are nested (model.KEY)", code="config-unknown-key")
        else:
            values[key] = _parse_value(text)
    return TrainConfig.from_dict(values)
