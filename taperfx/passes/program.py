"""``fold`` on an ExportedProgram and on a GraphModule with ``get_attr`` weights."""

from __future__ import annotations

import torch
from torch.export import ExportedProgram

from taperfx.passes.report import FoldError, FoldReport
from taperfx.passes.rewrite import fold_graph
from taperfx.passes.stores import AttributeStore, ProgramStore
from taperfx.passes.verify import verify as verify_outputs

__all__ = ["fold", "fold_program", "fold_graph_module"]


def fold_program(
    program: ExportedProgram, *, strict: bool = False, untie_shared: bool = False, verify: bool = False
) -> tuple[ExportedProgram, FoldReport]:
    """Fold every gate-zero norm of ``program`` into the linear layers it feeds (docs/method.md §8).

    Returns a new program and the report; ``program`` is not modified. Works on the
    default export IR (``aten.linear``) and after ``run_decompositions()``.

    - ``strict``: raise FoldError naming every norm that stays (real norms, gates
      above 0, users that are not linear layers, shared weights).
    - ``untie_shared``: fold a weight that something else also reads (tied
      embeddings) into a copy; otherwise that norm stays and the report gives the cost.
    - ``verify``: run both programs on ``program.example_inputs`` and raise
      FoldError if any output moves beyond ``taperfx.passes.verify.TOLERANCES``.
    """
    if not isinstance(program, ExportedProgram):
        raise TypeError(f"fold expects a torch.export.ExportedProgram, got {type(program).__name__}")
    store = ProgramStore(program)
    report = fold_graph(store, strict=strict, untie_shared=untie_shared)
    folded = store.result()
    if verify:
        if program.example_inputs is None:
            raise ValueError("verify=True needs the program's example inputs, and this program has none")
        args, kwargs = program.example_inputs
        check = verify_outputs(program, folded, args, kwargs)
        if not check.ok:
            raise FoldError(f"folded program does not match the original:\n{check}")
    return folded, report


def fold(
    program: ExportedProgram, *, strict: bool = False, untie_shared: bool = False, verify: bool = False
) -> ExportedProgram:
    """``fold_program`` without the report: the folded ExportedProgram."""
    return fold_program(program, strict=strict, untie_shared=untie_shared, verify=verify)[0]


def fold_graph_module(
    module: torch.fx.GraphModule, *, strict: bool = False, untie_shared: bool = False
) -> tuple[torch.fx.GraphModule, FoldReport]:
    """The same fold on an aten-level GraphModule whose weights are ``get_attr`` attributes.

    This is the entry point for a ``torch.compile`` backend that has frozen the
    parameters into attributes. Nodes need ``meta["val"]`` (as make_fx, AOTAutograd
    and export leave them) so the matcher can see feature sizes; a map whose
    shapes it cannot see is left alone. Folded tensors become new top-level
    attributes; ``module`` is not modified.
    """
    if not isinstance(module, torch.fx.GraphModule):
        raise TypeError(f"fold_graph_module expects a torch.fx.GraphModule, got {type(module).__name__}")
    store = AttributeStore(module)
    report = fold_graph(store, strict=strict, untie_shared=untie_shared)
    return store.result(), report
