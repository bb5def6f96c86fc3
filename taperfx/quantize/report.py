"""What a quantization pass did: the weights it quantized, those it left in float and why, and the bytes."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["QuantizeReport"]


@dataclass
class QuantizeReport:
    scheme: str
    quantized: list[str] = field(default_factory=list)
    kept: list[tuple[str, str]] = field(default_factory=list)  # (name, reason)
    float_bytes: int = 0  # the quantized weights' size before
    quantized_bytes: int = 0  # and after (codes, scales, zeros; padding included)

    def __str__(self) -> str:
        ratio = self.float_bytes / self.quantized_bytes if self.quantized_bytes else 0.0
        lines = [
            f"quantize {self.scheme}: {len(self.quantized)} weights quantized, "
            f"{self.float_bytes / 2**20:.2f} MiB -> {self.quantized_bytes / 2**20:.2f} MiB ({ratio:.2f}x smaller)"
        ]
        lines += [f"  kept in float: {name} ({reason})" for name, reason in self.kept]
        return "\n".join(lines)
