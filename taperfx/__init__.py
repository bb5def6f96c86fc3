"""taperfx: train normalization away (TaperNorm), fold it into the weights, ship a norm-free graph.

The public names are imported on first use (module ``__getattr__``, PEP 562), so that
``import taperfx`` and ``taperfx --help`` do not pay for importing torch.
"""

from __future__ import annotations

import importlib
import sys
import types

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "TaperNorm": "taperfx.norms",
    "TaperRMSNorm": "taperfx.norms",
    "TaperLayerNorm": "taperfx.norms",
    "CalibrationError": "taperfx.norms",
    "GateSchedule": "taperfx.schedule",
    "ScaleAnchor": "taperfx.scale_loss",
    "token_scale": "taperfx.scale_loss",
    "Protocol": "taperfx.kinds",
    "NormKind": "taperfx.kinds",
    "convert": "taperfx.convert",
    "calibrate": "taperfx.convert",
    "set_gate": "taperfx.convert",
    "start_taper": "taperfx.convert",
    "gate_of": "taperfx.convert",
    "is_calibrated": "taperfx.convert",
    "ConversionError": "taperfx.convert",
    "ConversionWarning": "taperfx.convert",
    "tapernorms": "taperfx.convert",
    "find_norms": "taperfx.convert",
    "find_final_norm": "taperfx.convert",
    "fold": "taperfx.passes",
    "fold_program": "taperfx.passes",
    "fold_graph_module": "taperfx.passes",
    "fold_module": "taperfx.passes",
    "verify": "taperfx.passes",
    "FoldReport": "taperfx.passes",
    "FoldError": "taperfx.passes",
    "quantize": "taperfx.quantize",  # the package itself, callable: taperfx.quantize(program_or_module, config)
    "Int4WeightOnly": "taperfx.quantize",
    "Int8WeightOnly": "taperfx.quantize",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'taperfx' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


class _Package(types.ModuleType):
    """Keeps ``taperfx.convert`` the function: importing the submodule ``taperfx.convert`` would otherwise
    set the package attribute to the module (the import system's ``setattr(parent, child, module)``)."""

    def __setattr__(self, name: str, value) -> None:
        if isinstance(value, types.ModuleType) and name in _EXPORTS and _EXPORTS[name] == f"{__name__}.{name}":
            return  # the submodule stays reachable through sys.modules
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
