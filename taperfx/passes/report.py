"""What a fold did: which norms went into which weights, which stayed and why, and what it cost."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["FoldReport", "FoldedNorm", "SkippedNorm", "FoldError"]


class FoldError(ValueError):
    """Raised by ``strict=True`` when a norm cannot be folded, and by ``verify=True`` when outputs drift."""


@dataclass(frozen=True)
class FoldedNorm:
    name: str  # module path of the norm (or node name when the graph carries no module stack)
    kind: str  # "rms": x ⊙ s;  "ln": (x − mean x) ⊙ s + β
    weights: tuple[str, ...]  # the weights it was folded into


@dataclass(frozen=True)
class SkippedNorm:
    name: str
    reason: str


@dataclass
class FoldReport:
    folded: list[FoldedNorm] = field(default_factory=list)
    skipped: list[SkippedNorm] = field(default_factory=list)
    params_added: list[str] = field(default_factory=list)
    params_removed: list[str] = field(default_factory=list)
    bytes_before: int = 0
    bytes_after: int = 0
    seconds: float = 0.0

    @property
    def bytes_saved(self) -> int:
        """Stored bytes the program no longer holds (negative when untying copied weights)."""
        return self.bytes_before - self.bytes_after

    def skip(self, name: str, reason: str) -> None:
        """Record a skipped norm once, keeping the first reason found for it."""
        if all(s.name != name for s in self.skipped):
            self.skipped.append(SkippedNorm(name, reason))

    def __str__(self) -> str:
        lines = [
            f"folded {len(self.folded)} norm(s), skipped {len(self.skipped)}; "
            f"params +{len(self.params_added)} -{len(self.params_removed)}; "
            f"{self.bytes_saved / 2**20:+.2f} MiB saved; {self.seconds * 1e3:.1f} ms"
        ]
        lines += [f"  folded  {f.name} ({f.kind}) -> {', '.join(f.weights)}" for f in self.folded]
        lines += [f"  skipped {s.name}: {s.reason}" for s in self.skipped]
        if self.params_added:
            lines.append(f"  added   {', '.join(self.params_added)}")
        return "\n".join(lines)
