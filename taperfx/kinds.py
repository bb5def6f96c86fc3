"""The names that travel between packages: training protocols and norm kinds.

They are string enums so that they compare equal to, and serialise as, the bare
strings that checkpoints, ``run.json`` and fold reports have always held
(``json.dumps(Protocol.ALL) == '"all"'``); code that builds or checks them uses the
members, so a typo is an AttributeError instead of a silent mismatch.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = ["Protocol", "NormKind"]


class Protocol(StrEnum):
    """Which norms a run tapers (docs/method.md §6)."""

    BASELINE = "baseline"  # no norm tapers
    INTERNAL = "internal"  # every norm but the final one (the scale anchor)
    ALL = "all"  # every norm, the final one too (needs the scale loss)

    @classmethod
    def tapering(cls) -> tuple["Protocol", ...]:
        """The protocols that convert norms, i.e. the valid modes of ``taperfx.convert``."""
        return (cls.INTERNAL, cls.ALL)


class NormKind(StrEnum):
    """The two normalizers TaperNorm starts from (docs/method.md §1)."""

    RMS = "rms"  # x / r(x) ⊙ γ; at g = 0 the map x ⊙ s
    LN = "ln"  # x̄ / σ(x) ⊙ γ + β; at g = 0 the map x̄ ⊙ s + β
