"""Quantized, norm-free deployment: the step after ``taperfx.fold``.

``taperfx.quantize(program_or_module, config)`` returns a quantized copy of a
folded ExportedProgram (the ``.pt2`` path) or of an ``nn.Module`` (eager and
``torch.compile``); ``quantize_with_report`` also returns what was done. Schemes:
``Int4WeightOnly(group_size=32|64|128)`` and ``Int8WeightOnly()``, each with
``head=`` (quantize the output projection, untied from the embedding) and
``embedding=`` (store the token table quantized). ONNX goes through ONNX Runtime's
own quantizer: ``taperfx.export.quantized``.

The names are imported on first use (PEP 562), so that the configs and the
command-line option (``taperfx.quantize.arguments``) load without torch and
``taperfx COMMAND --help`` stays fast. ``taperfx.quantize.ops`` registers the
``taperfx::`` operators a quantized program calls; ``taperfx.export.program.load_program``
imports it before ``torch.export.load``.
"""

from __future__ import annotations

import importlib
import sys
import types

# public name -> the module that defines it
_EXPORTS = {
    "quantize_with_report": "taperfx.quantize.api",
    "quantize_module": "taperfx.quantize.module",
    "quantize_program": "taperfx.quantize.program",
    "QuantizeConfig": "taperfx.quantize.config",
    "Int4WeightOnly": "taperfx.quantize.config",
    "Int8WeightOnly": "taperfx.quantize.config",
    "parse_scheme": "taperfx.quantize.config",
    "SCHEMES": "taperfx.quantize.config",
    "GROUP_SIZES": "taperfx.quantize.config",
    "QuantizeReport": "taperfx.quantize.report",
    "Agreement": "taperfx.quantize.agreement",
    "agreement": "taperfx.quantize.agreement",
    "QuantizeError": "taperfx.quantize.errors",
    "UnknownScheme": "taperfx.quantize.errors",
    "UnsupportedShape": "taperfx.quantize.errors",
    "UnsupportedDevice": "taperfx.quantize.errors",
    "NotQuantized": "taperfx.quantize.errors",
}

__all__ = ["quantize", *_EXPORTS]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'taperfx.quantize' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


class _CallableModule(types.ModuleType):
    """Lets ``taperfx.quantize(model, config)`` be the function while ``taperfx.quantize.X`` stays this package."""

    def __call__(self, source, config):
        """A quantized copy of ``source`` (a folded ExportedProgram or an nn.Module); the input is not modified."""
        from taperfx.quantize.api import quantize_with_report

        return quantize_with_report(source, config)[0]


sys.modules[__name__].__class__ = _CallableModule
# ``from taperfx.quantize import quantize`` and ``taperfx.quantize`` are this callable package, so that
# ``import taperfx.quantize as tq`` keeps working however the facade resolved the name first.
quantize = sys.modules[__name__]
