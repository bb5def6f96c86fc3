"""Quantized, norm-free deployment: the step after ``taperfx.fold``.

``taperfx.quantize(program_or_module, config)`` returns a quantized copy of a
folded ExportedProgram (the ``.pt2`` path) or of an ``nn.Module`` (eager and
``torch.compile``); ``quantize_with_report`` also returns what was done. Schemes:
``Int4WeightOnly(group_size=32|64|128)`` and ``Int8WeightOnly()``, each with
``head=`` (quantize the output projection, untied from the embedding) and
``embedding=`` (store the token table quantized). ONNX goes through ONNX Runtime's
own quantizer: ``taperfx.export.quantized``.

Importing this package registers the ``taperfx::`` operators a quantized program
calls, so ``import taperfx.quantize`` before ``torch.export.load`` of one.
"""

from __future__ import annotations

import sys
import types

from torch import nn
from torch.export import ExportedProgram

from taperfx.quantize.agreement import Agreement, agreement
from taperfx.quantize.config import GROUP_SIZES, SCHEMES, Int4WeightOnly, Int8WeightOnly, QuantizeConfig, parse_scheme
from taperfx.quantize.errors import NotQuantized, QuantizeError, UnknownScheme, UnsupportedDevice, UnsupportedShape
from taperfx.quantize.module import quantize_module
from taperfx.quantize.program import quantize_program
from taperfx.quantize.report import QuantizeReport

__all__ = [
    "quantize",
    "quantize_with_report",
    "quantize_module",
    "quantize_program",
    "QuantizeConfig",
    "Int4WeightOnly",
    "Int8WeightOnly",
    "parse_scheme",
    "SCHEMES",
    "GROUP_SIZES",
    "QuantizeReport",
    "Agreement",
    "agreement",
    "QuantizeError",
    "UnknownScheme",
    "UnsupportedShape",
    "UnsupportedDevice",
    "NotQuantized",
]


def quantize_with_report(
    source: ExportedProgram | nn.Module, config: QuantizeConfig
) -> tuple[ExportedProgram | nn.Module, QuantizeReport]:
    """A quantized copy of ``source`` (same kind) and the report of what was quantized and kept."""
    if isinstance(source, ExportedProgram):
        return quantize_program(source, config)
    if isinstance(source, nn.Module):
        return quantize_module(source, config)
    raise TypeError(f"expected an ExportedProgram or an nn.Module, got {type(source).__name__}")


class _CallableModule(types.ModuleType):
    """Lets ``taperfx.quantize(model, config)`` be the function while ``taperfx.quantize.X`` stays this package."""

    def __call__(self, source: ExportedProgram | nn.Module, config: QuantizeConfig) -> ExportedProgram | nn.Module:
        """A quantized copy of ``source`` (a folded ExportedProgram or an nn.Module); the input is not modified."""
        return quantize_with_report(source, config)[0]


sys.modules[__name__].__class__ = _CallableModule
# ``from taperfx.quantize import quantize`` and ``taperfx.quantize`` are this callable package, so that
# ``import taperfx.quantize as tq`` keeps working however the facade resolved the name first.
quantize = sys.modules[__name__]
