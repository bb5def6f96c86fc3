"""What to quantize and how: the two weight-only schemes, and their spelling on the command line.

A config says only *what* the user wants (bits, group size, whether the output
head and the token embedding are included); which kernel does it is the
handlers' business (``taperfx.quantize.handlers``), chosen by the device the
weights live on.
"""

from __future__ import annotations

from dataclasses import dataclass

from taperfx.quantize.errors import UnknownScheme

__all__ = ["QuantizeConfig", "Int4WeightOnly", "Int8WeightOnly", "parse_scheme", "SCHEMES", "GROUP_SIZES"]

GROUP_SIZES = (32, 64, 128)
SCHEMES = ("int4", "int8")


@dataclass(frozen=True)
class QuantizeConfig:
    """Common options. ``head``: quantize the output projection (untied from the embedding when they share
    a weight). ``embedding``: also store the token embedding quantized (rows are dequantized as gathered);
    by default the gather stays exact."""

    head: bool = True
    embedding: bool = False


@dataclass(frozen=True)
class Int4WeightOnly(QuantizeConfig):
    """4-bit weights, asymmetric, one (scale, zero) per ``group_size`` consecutive inputs of each output row.

    Groups run along the input axis, the axis folding scales (``W ← W·diag(s)``), so a group's range
    only mixes the ``group_size`` columns it holds. Activations are computed in bfloat16 on CPU.
    """

    group_size: int = 32

    def __post_init__(self) -> None:
        if self.group_size not in GROUP_SIZES:
            raise UnknownScheme(f"int4 group size must be one of {GROUP_SIZES}, got {self.group_size}")

    @property
    def name(self) -> str:
        return f"int4:g{self.group_size}"


@dataclass(frozen=True)
class Int8WeightOnly(QuantizeConfig):
    """8-bit weights, symmetric, one scale per output row. Activations are computed in bfloat16 on CPU."""

    @property
    def name(self) -> str:
        return "int8"


def parse_scheme(text: str, *, head: bool = True, embedding: bool = False) -> QuantizeConfig:
    """``int4`` (group 32), ``int4:g64``, ``int4:g128`` or ``int8`` as a config."""
    scheme, _, option = text.strip().lower().partition(":")
    if scheme == "int8" and not option:
        return Int8WeightOnly(head=head, embedding=embedding)
    if scheme == "int4":
        if not option:
            return Int4WeightOnly(head=head, embedding=embedding)
        if option.startswith("g") and option[1:].isdigit():
            return Int4WeightOnly(group_size=int(option[1:]), head=head, embedding=embedding)
    raise UnknownScheme(f"unknown quantization scheme {text!r}; choose int4, int4:g32, int4:g64, int4:g128 or int8")
