"""The paper's GPT-2 fine-tuning schedules (docs/method.md §5; the paper's Appendix D), selectable by name.

Each preset fixes the run length, the end of the linear LR warmup and the taper
window; everything else (data, batch, λ) stays the user's choice. ``overrides``
turns a preset into ``TrainConfig`` keys, applied before the user's own overrides
so that any of them can still be changed on the command line.
"""

from __future__ import annotations

from dataclasses import dataclass

from taperfx.errors import BadInput

__all__ = ["FinetunePreset", "GPT2_FINETUNE", "finetune_preset"]


@dataclass(frozen=True)
class FinetunePreset:
    steps: int
    warmup: int  # last step of the linear LR warmup
    taper_start: int
    taper_end: int

    def overrides(self) -> dict:
        """``TrainConfig`` keys: the trainer's warmup is a fraction of the steps, exact for these integers."""
        return {
            "steps": self.steps,
            "warmup_frac": self.warmup / self.steps,
            "taper_start": self.taper_start,
            "taper_end": self.taper_end,
        }


GPT2_FINETUNE = {
    "gpt2-small": FinetunePreset(steps=300, warmup=25, taper_start=25, taper_end=100),
    "gpt2-medium": FinetunePreset(steps=500, warmup=10, taper_start=20, taper_end=200),
    "gpt2-large": FinetunePreset(steps=600, warmup=30, taper_start=30, taper_end=500),
    "gpt2-xl": FinetunePreset(steps=800, warmup=20, taper_start=50, taper_end=700),
}


def finetune_preset(name: str) -> FinetunePreset:
    try:
        return GPT2_FINETUNE[name]
    except KeyError:
        raise BadInput(f"unknown fine-tuning preset {name!r}; known: {sorted(GPT2_FINETUNE)}") from None
