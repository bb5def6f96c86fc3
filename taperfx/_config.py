"""JSON round-trip shared by the dataclass configs (model, training) stored in checkpoints."""

from __future__ import annotations

import dataclasses
from typing import ClassVar


class DictConfig:
    """``to_dict`` / ``from_dict`` for a dataclass; unknown keys are refused by name, not ignored."""

    config_kind: ClassVar[str] = "config"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown {cls.config_kind} keys: {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)
