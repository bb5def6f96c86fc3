"""The global gate schedule (docs/method.md §5): 1, then a cosine taper, then 0."""

from __future__ import annotations

import math

from torch import nn

from taperfx.convert import set_gate, start_taper
from taperfx.errors import BadInput

__all__ = [
    "FINE_TUNE_CALIBRATION_STEPS",
    "FROM_SCRATCH_CALIBRATION_STEPS",
    "MIN_TAPER_WINDOWS",
    "GateSchedule",
    "ScheduleError",
    "calibration_window",
    "check_taper_length",
    "check_taper_start",
]

# From scratch, the residual stream grows from its initial scale (embeddings of std 0.02, c ≈ 1/r ≈ 50)
# by one to two orders of magnitude over the first ~30-80 optimizer steps at lr 1e-3, and only then settles
# (bench/results/calibration_transient.md). A c frozen inside that transient is up to 100x too large for
# the trained stream, and the g = 0 branch blows up through the SwiGLU blocks as the gate falls.
FROM_SCRATCH_CALIBRATION_STEPS = 100
# A pretrained model's stream has its trained scale from the first step (the paper's GPT-2 schedules
# start the taper 10-50 steps into fine-tuning).
FINE_TUNE_CALIBRATION_STEPS = 20
# The shortest taper, in calibration windows, that the stability sweep showed the network absorbs.
MIN_TAPER_WINDOWS = 2


class ScheduleError(BadInput):
    """A schedule the method cannot survive: ``code`` names the problem, ``details`` its numbers,
    ``suggestion`` a schedule that works."""

    def __init__(self, code: str, message: str, suggestion: str, **details: int) -> None:
        super().__init__(f"{message}; {suggestion}", code=code)
        self.suggestion, self.details = suggestion, details


def calibration_window(
    steps: int, calibration_steps: int | None, *, from_scratch: bool = True, tapered: bool = True
) -> int:
    """Steps at g = 1 that calibrate ``c`` (and the scale loss's target) before the taper may start.

    An explicit ``calibration_steps`` is taken as given. By default a tapered run from scratch
    calibrates over ``FROM_SCRATCH_CALIBRATION_STEPS``, so that ``c`` is frozen after the
    residual stream's early growth (``check_taper_length`` refuses runs too short for that).
    Otherwise (fine-tuning, ``FINE_TUNE_CALIBRATION_STEPS``; or a baseline, which only freezes
    its scale target) a default longer than a quarter of the run shrinks to that quarter (at
    least one step: a calibration needs a batch).
    """
    if calibration_steps is not None:
        return int(calibration_steps)
    if from_scratch and tapered:
        return FROM_SCRATCH_CALIBRATION_STEPS
    default = FROM_SCRATCH_CALIBRATION_STEPS if from_scratch else FINE_TUNE_CALIBRATION_STEPS
    return max(1, min(default, int(steps) // 4))


def check_taper_start(taper_start: int, window: int) -> None:
    """Refuse a taper that starts before the calibration window has ended."""
    if taper_start < window:
        raise ScheduleError(
            "calibration-window-too-short",
            f"taper_start {taper_start} leaves fewer than the {window} calibration steps at g = 1",
            f"start the taper at step {window} or later, or lower calibration_steps to {max(1, taper_start)} "
            "to accept a calibration at initialisation statistics (wide models diverged with it)",
            taper_start=taper_start,
            calibration_window=window,
        )


def check_taper_length(steps: int, taper_start: int, taper_end: int) -> None:
    """Refuse a from-scratch taper under the default calibration that is shorter than the method survives:
    ``c`` needs ``FROM_SCRATCH_CALIBRATION_STEPS`` steps at g = 1, then the gate needs
    ``MIN_TAPER_WINDOWS`` times as many to fall (``taper_end - taper_start + 1`` steps, the last at g = 0)."""
    window = FROM_SCRATCH_CALIBRATION_STEPS
    needed = MIN_TAPER_WINDOWS * window
    if taper_end - taper_start + 1 < needed:
        raise ScheduleError(
            "schedule-too-short",
            f"a tapered run from scratch needs {window} calibration steps at g = 1 and a taper of at least "
            f"{needed} steps; this schedule has {steps} steps, tapering from step {taper_start} to {taper_end}",
            f"train at least {window + needed} steps, or set calibration_steps explicitly to accept a c calibrated "
            "during the residual stream's early growth (such runs diverged in bench/results/stability_sweep.md)",
            steps=steps,
            taper_start=taper_start,
            taper_end=taper_end,
            calibration_window=window,
            min_taper=needed,
        )


class GateSchedule:
    """``g(t)``: 1 before ``taper_start``, half-cosine down to 0 at ``taper_end``, 0 after.

    ``apply(model, step)`` is the one call a training loop needs: at the first step
    with ``t >= taper_start`` it freezes the calibration (``start_taper``), and every
    step it sets the shared gate of every TaperNorm. ``state_dict`` records the last
    applied step so that a resumed run sets the same gate.
    """

    def __init__(self, taper_start: int, taper_end: int) -> None:
        taper_start, taper_end = int(taper_start), int(taper_end)
        if taper_start < 0:
            raise ValueError(f"taper_start must be >= 0, got {taper_start}")
        if taper_end < taper_start:
            raise ValueError(f"taper_end ({taper_end}) must be >= taper_start ({taper_start})")
        self.taper_start = taper_start
        self.taper_end = taper_end
        self.last_step: int | None = None

    def __call__(self, step: int) -> float:
        if step < self.taper_start:
            return 1.0
        if step >= self.taper_end:
            return 0.0
        progress = (step - self.taper_start) / (self.taper_end - self.taper_start)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    def apply(self, model: nn.Module, step: int) -> float:
        g = self(step)
        if step >= self.taper_start:
            start_taper(model)
        set_gate(model, g)
        self.last_step = int(step)
        return g

    def state_dict(self) -> dict:
        return {"taper_start": self.taper_start, "taper_end": self.taper_end, "last_step": self.last_step}

    def load_state_dict(self, state: dict) -> None:
        self.__init__(state["taper_start"], state["taper_end"])
        self.last_step = state.get("last_step")

    def __repr__(self) -> str:
        return f"GateSchedule(taper_start={self.taper_start}, taper_end={self.taper_end})"
