"""``fold`` on an ExportedProgram and on a GraphModule with ``get_attr`` weights."""

from __future__ import annotations

import time

import torch
from torch.export import ExportedProgram

from taperfx.passes.pipeline import run_pipeline
from taperfx.passes.reasons import SkipReason
from taperfx.passes.report import FoldError, FoldReport
from taperfx.passes.stores import AttributeStore, ProgramStore
from taperfx.passes.verify import expected_outputs
from taperfx.passes.verify import verify as verify_outputs

__all__ = ["fold", "fold_program", "fold_graph_module", "verify_fold"]


def fold_program(
    program: ExportedProgram,
    *,
    strict: bool = False,
    untie_shared: bool = False,
    verify: bool = True,
    inplace: bool = False,
) -> tuple[ExportedProgram, FoldReport]:
    """Fold every gate-zero norm of ``program`` into the linear layers it feeds (docs/method.md §8).

    Returns a new program and the report; ``program`` is not modified. Works on the
    default export IR (``aten.linear``, ``matmul``) and after ``run_decompositions()``.
    Every rewritten layer is checked against the original nodes before it is kept
    (``report.layers_checked``); a norm whose check fails stays, code ``check_failed``.

    - ``strict``: raise FoldError (with the first refusal's ``code``) if any norm stays.
    - ``untie_shared``: fold a weight that something else also reads (tied
      embeddings) into a copy; otherwise that norm stays and the report gives the cost.
    - ``verify`` (default on): run both programs on ``program.example_inputs`` and
      raise FoldError (code ``verify_failed``) if the folded one is further from a
      float64 evaluation of the original than the original itself allows (see
      ``taperfx.passes.verify``). ``verify=False`` skips it (and a program without
      example inputs cannot be verified: pass ``verify=False``).
    - ``inplace``: write the folded weights into ``program``'s own tensors instead of new
      ones (no allocation of the weights' size; ``taperfx.passes.inplace``). The caller
      gives ``program`` up: its weights, which it shares with the model it was exported
      from, are rewritten, and the result shares them. The global check then compares
      against the float64 reference captured before the fold.
    """
    if not isinstance(program, ExportedProgram):
        raise TypeError(f"fold expects a torch.export.ExportedProgram, got {type(program).__name__}")
    if verify and program.example_inputs is None:
        raise ValueError("verify=True needs the program's example inputs, and this program has none; pass verify=False")
    expected = None
    if verify and inplace:  # the original's outputs, before its weights are overwritten
        start = time.perf_counter()
        expected = expected_outputs(program, *program.example_inputs)
        checking = time.perf_counter() - start
    result = run_pipeline(lambda: ProgramStore(program), strict=strict, untie_shared=untie_shared, inplace=inplace)
    folded, report = result.store.result(), result.report
    if verify and report.folded:
        args, kwargs = program.example_inputs
        verify_fold(program, folded, args, kwargs, report, expected=expected)
        if expected is not None:
            report.verify_seconds += checking
    return folded, report


def verify_fold(
    original, folded, args: tuple, kwargs: dict | None, report: FoldReport, *, reference=None, expected=None
) -> None:
    """The global check: compare ``folded`` with ``original`` on example inputs; record it in ``report``."""
    start = time.perf_counter()
    check = verify_outputs(original, folded, tuple(args), kwargs, reference=reference, expected=expected)
    report.verify_seconds = time.perf_counter() - start
    if not check.ok:
        raise FoldError(f"folded program does not match the original:\n{check}", code=SkipReason.VERIFY_FAILED)
    report.verified = True


def fold(
    program: ExportedProgram,
    *,
    strict: bool = False,
    untie_shared: bool = False,
    verify: bool = True,
    inplace: bool = False,
) -> ExportedProgram:
    """``fold_program`` without the report: the folded ExportedProgram."""
    return fold_program(program, strict=strict, untie_shared=untie_shared, verify=verify, inplace=inplace)[0]


def fold_graph_module(
    module: torch.fx.GraphModule, *, strict: bool = False, untie_shared: bool = False
) -> tuple[torch.fx.GraphModule, FoldReport]:
    """The same fold on an aten-level GraphModule whose weights are ``get_attr`` attributes.

    Nodes need ``meta["val"]`` (as make_fx, AOTAutograd and export leave them) so the
    matcher can see feature sizes; a map whose shapes it cannot see is left alone.
    Folded tensors become new top-level attributes; ``module`` is not modified. Every
    rewrite is checked locally (there are no example inputs for a global check).
    """
    if not isinstance(module, torch.fx.GraphModule):
        raise TypeError(f"fold_graph_module expects a torch.fx.GraphModule, got {type(module).__name__}")
    result = run_pipeline(lambda: AttributeStore(module), strict=strict, untie_shared=untie_shared)
    return result.store.result(), result.report
