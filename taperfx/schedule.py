"""The global gate schedule (docs/method.md §5): 1, then a cosine taper, then 0."""

from __future__ import annotations

import math

from torch import nn

from taperfx.convert import set_gate, start_taper
from taperfx.errors import BadInput

__all__ = ["GateSchedule", "ScheduleError", "calibration_window", "check_taper_start"]


class ScheduleError(BadInput):
    """A schedule the method cannot survive: ``code`` names the problem, ``details`` its numbers,
    ``suggestion`` a schedule that works."""

    def __init__(self, code: str, message: str, suggestion: str, **details: int) -> None:
        super().__init__(f"{message}; {suggestion}", code=code)
        self.suggestion, self.details = suggestion, details


def calibration_window(steps: int, calibration_steps: int) -> int:
    """Steps at g = 1 that calibrate ``c`` before the taper may start: ``calibration_steps``,
    or a quarter of a run too short for that (at least one: ``c`` needs a batch).

    ``c`` estimated from the first few batches reflects initialisation statistics
    (``c ≈ 1/r(x)``, tens at init); frozen there, a wide model diverged as the gate fell
    (bench/results/stability_sweep.md). Twenty steps of training let ``r(x)`` settle first.
    """
    return max(1, min(int(calibration_steps), int(steps) // 4))


def check_taper_start(taper_start: int, window: int) -> None:
    """Refuse a taper that starts before the calibration window has ended."""
    if taper_start < window:
        raise ScheduleError(
            "calibration_window_too_short",
            f"taper_start {taper_start} leaves fewer than the {window} calibration steps at g = 1",
            f"start the taper at step {window} or later, or lower calibration_steps to {max(1, taper_start)} "
            "to accept a calibration at initialisation statistics (wide models diverged with it)",
            taper_start=taper_start,
            calibration_window=window,
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
