"""What a fold did: which norms went into which weights, which stayed and why, what was checked, what it cost."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from taperfx.errors import TaperfxError
from taperfx.passes.reasons import SkipReason

__all__ = ["FoldReport", "FoldedNorm", "SkippedNorm", "FoldError"]


class FoldError(TaperfxError, ValueError):
    """Raised by ``strict=True`` when a norm stays, by the global check when outputs drift, and by a folded
    module's guard on a call path its trace did not see; ``code`` is a ``SkipReason`` value."""

    code = SkipReason.STRICT.value


@dataclass(frozen=True)
class FoldedNorm:
    name: str  # module path of the norm (or node name when the graph carries no module stack)
    kind: str  # "rms": x ⊙ s;  "ln": (x − mean x) ⊙ s + β
    weights: tuple[str, ...]  # the weights it was folded into


@dataclass(frozen=True)
class SkippedNorm:
    name: str
    code: SkipReason
    reason: str  # the detail, for people

    def __str__(self) -> str:
        return f"{self.name}: [{self.code.value}] {self.reason}"


@dataclass
class FoldReport:
    folded: list[FoldedNorm] = field(default_factory=list)
    skipped: list[SkippedNorm] = field(default_factory=list)
    params_added: list[str] = field(default_factory=list)
    params_removed: list[str] = field(default_factory=list)
    bytes_before: int = 0
    bytes_after: int = 0
    seconds: float = 0.0
    layers_checked: int = 0  # linear layers whose rewrite was checked against the original nodes
    check_seconds: float = 0.0
    verified: bool = False  # the whole folded program was compared with the original on example inputs
    verify_seconds: float = 0.0

    @property
    def bytes_saved(self) -> int:
        """Stored bytes the program no longer holds (negative when untying copied weights)."""
        return self.bytes_before - self.bytes_after

    @property
    def codes(self) -> dict[str, str]:
        """``{skipped norm: reason code}``."""
        return {s.name: s.code.value for s in self.skipped}

    def skip(self, name: str, code: SkipReason, reason: str) -> None:
        """Record a skipped norm once, keeping the first reason found for it."""
        if all(s.name != name for s in self.skipped):
            self.skipped.append(SkippedNorm(name, SkipReason(code), reason))

    def to_json(self) -> dict:
        """A JSON-ready dict (codes as strings), for the CLI and for logs."""
        out = asdict(self)
        out["skipped"] = [{"name": s.name, "code": s.code.value, "reason": s.reason} for s in self.skipped]
        out["folded"] = [{"name": f.name, "kind": f.kind, "weights": list(f.weights)} for f in self.folded]
        out["bytes_saved"] = self.bytes_saved
        return out

    def summary_of_checks(self) -> str:
        """One line saying what was checked (the CLI prints it)."""
        verified = f"verified on example inputs in {self.verify_seconds:.2f} s" if self.verified else "not verified"
        return f"checked {self.layers_checked} rewritten layer(s) in {self.check_seconds:.2f} s; {verified}"

    def __str__(self) -> str:
        lines = [
            f"folded {len(self.folded)} norm(s), skipped {len(self.skipped)}; "
            f"params +{len(self.params_added)} -{len(self.params_removed)}; "
            f"{self.bytes_saved / 2**20:+.2f} MiB saved; {self.seconds * 1e3:.1f} ms",
            f"  {self.summary_of_checks()}",
        ]
        lines += [f"  folded  {f.name} ({f.kind}) -> {', '.join(f.weights)}" for f in self.folded]
        lines += [f"  skipped {s}" for s in self.skipped]
        if self.params_added:
            lines.append(f"  added   {', '.join(self.params_added)}")
        return "\n".join(lines)
