"""Compiler passes: fold gate-zero TaperNorms into the linear layers they feed (docs/method.md §8;
passes/README.md lists the invariants every pass keeps)."""

from taperfx.passes.eager import fold_module
from taperfx.passes.program import fold, fold_graph_module, fold_program
from taperfx.passes.reasons import SkipReason
from taperfx.passes.report import FoldedNorm, FoldError, FoldReport, SkippedNorm
from taperfx.passes.verify import TOLERANCES, Verification, verify

__all__ = [
    "fold",
    "fold_program",
    "fold_graph_module",
    "fold_module",
    "verify",
    "Verification",
    "TOLERANCES",
    "FoldReport",
    "FoldedNorm",
    "SkippedNorm",
    "SkipReason",
    "FoldError",
]
