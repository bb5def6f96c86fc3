"""``quantize_with_report``: one entry point for both kinds of source, ExportedProgram or nn.Module."""

from __future__ import annotations

from torch import nn
from torch.export import ExportedProgram

from taperfx.quantize.config import QuantizeConfig
from taperfx.quantize.module import quantize_module
from taperfx.quantize.program import quantize_program
from taperfx.quantize.report import QuantizeReport

__all__ = ["quantize_with_report"]


def quantize_with_report(
    source: ExportedProgram | nn.Module, config: QuantizeConfig
) -> tuple[ExportedProgram | nn.Module, QuantizeReport]:
    """A quantized copy of ``source`` (same kind) and the report of what was quantized and kept."""
    if isinstance(source, ExportedProgram):
        return quantize_program(source, config)
    if isinstance(source, nn.Module):
        return quantize_module(source, config)
    raise TypeError(f"expected an ExportedProgram or an nn.Module, got {type(source).__name__}")
