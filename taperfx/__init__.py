"""taperfx: train normalization away (TaperNorm), fold it into the weights, ship a norm-free graph."""

from taperfx.convert import (
    ConversionError,
    ConversionWarning,
    calibrate,
    convert,
    find_final_norm,
    find_norms,
    gate_of,
    is_calibrated,
    set_gate,
    start_taper,
    tapernorms,
)
from taperfx.kinds import NormKind, Protocol
from taperfx.norms import CalibrationError, TaperLayerNorm, TaperNorm, TaperRMSNorm
from taperfx.passes import FoldError, FoldReport, fold, fold_graph_module, fold_module, fold_program, verify
from taperfx.scale_loss import ScaleAnchor, token_scale
from taperfx.schedule import GateSchedule

__version__ = "0.1.0"

__all__ = [
    "TaperNorm",
    "TaperRMSNorm",
    "TaperLayerNorm",
    "GateSchedule",
    "ScaleAnchor",
    "token_scale",
    "Protocol",
    "NormKind",
    "convert",
    "calibrate",
    "set_gate",
    "start_taper",
    "gate_of",
    "is_calibrated",
    "ConversionError",
    "ConversionWarning",
    "CalibrationError",
    "tapernorms",
    "find_norms",
    "find_final_norm",
    "fold",
    "fold_program",
    "fold_graph_module",
    "fold_module",
    "verify",
    "FoldReport",
    "FoldError",
]
