"""``fold_module``: the fold on an eager model (the paper's "fused" decoding in plain PyTorch).

Which linear layers read a norm is a property of ``forward``, not of the module
tree, so the model is traced with ``torch.export`` on example inputs and the same
matcher as ``fold`` runs on that graph. A TaperNorm becomes ``nn.Identity`` only
when the trace proves all of this:

- the TaperNorm sits at g = 0 and is called exactly once;
- every user of its output is a call of an ``nn.Linear`` (or Hugging Face
  ``Conv1D``) module on that output, with the module's own weight, and each such
  module is called exactly once in the whole forward.

Anything else leaves the norm in place and the report says why; it never guesses
from names or registration order.
"""

from __future__ import annotations

import copy
import time
from collections import defaultdict

import torch
from torch import nn

from taperfx.norms import TaperNorm
from taperfx.passes.report import FoldedNorm, FoldError, FoldReport
from taperfx.passes.rewrite import plan_folds
from taperfx.passes.stores import ProgramStore
from taperfx.passes.weights import fold_linear, one_intra_op_thread

__all__ = ["fold_module"]


def _linear_types() -> tuple[tuple[type, bool], ...]:
    """``(module type, weight stored (in, out))`` pairs a norm can fold into."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return ((nn.Linear, False),)
    return ((nn.Linear, False), (Conv1D, True))


def _call_counts(graph: torch.fx.Graph) -> dict[str, int]:
    """How many distinct calls of each module path the trace recorded."""
    calls = defaultdict(set)
    for node in graph.nodes:
        for key, (path, _) in (node.meta.get("nn_module_stack") or {}).items():
            calls[path].add(key)
    return {path: len(keys) for path, keys in calls.items()}


def fold_module(
    model: nn.Module,
    example_args: tuple,
    example_kwargs: dict | None = None,
    *,
    strict: bool = False,
    untie_shared: bool = False,
) -> tuple[nn.Module, FoldReport]:
    """A copy of ``model`` with its gate-zero TaperNorms folded into the following linear layers.

    ``example_args``/``example_kwargs`` drive one trace (see the module docstring
    for the rule). ``strict`` and ``untie_shared`` mean what they mean for ``fold``.
    """
    start = time.perf_counter()
    model = copy.deepcopy(model)
    with torch.no_grad():
        program = torch.export.export(model, tuple(example_args), example_kwargs, strict=False)
    store = ProgramStore(program)
    report = FoldReport(bytes_before=sum(p.nbytes for p in model.parameters()))
    plans = plan_folds(store, report, untie_shared)
    calls = _call_counts(program.graph)
    accepted = []
    for norm, uses in plans:
        reason = _refusal(model, norm.name, [(store.target(u.weight), u) for u in uses], calls)
        if reason:
            report.skip(norm.name, reason)
        else:
            accepted.append((norm, uses))
    if strict and report.skipped:
        raise FoldError(
            "strict fold: these norms cannot be folded:\n"
            + "\n".join(f"  {s.name}: {s.reason}" for s in report.skipped)
        )
    for norm, uses in accepted:
        weights = []
        for use in uses:
            owner = store.target(use.weight).rpartition(".")[0]
            with one_intra_op_thread():
                weights.append(_fold_into(model.get_submodule(owner), owner, norm, report))
        parent, _, child = norm.name.rpartition(".")
        report.params_removed += [f"{norm.name}.{n}" for n, _ in model.get_submodule(norm.name).named_parameters()]
        setattr(model.get_submodule(parent), child, nn.Identity())
        report.folded.append(FoldedNorm(norm.name, norm.kind, tuple(weights)))
    report.bytes_after = sum(p.nbytes for p in model.parameters())
    report.seconds = time.perf_counter() - start
    return model, report


def _refusal(model: nn.Module, name: str, uses, calls: dict[str, int]) -> str | None:
    """Why the trace does not prove this norm can be replaced by identity (None when it does)."""
    norm = model.get_submodule(name) if name in dict(model.named_modules()) else None
    if not isinstance(norm, TaperNorm):
        return "the map is not a TaperNorm module's output, so there is no module to replace"
    if norm.gate_value != 0.0:
        return f"gate is {norm.gate_value:g}, not 0"
    if calls.get(name, 0) != 1:
        return f"the TaperNorm is called {calls.get(name, 0)} times; identity would change every call"
    for target, use in uses:
        owner, _, field = target.rpartition(".")
        module = model.get_submodule(owner) if owner in dict(model.named_modules()) else None
        kinds = [in_out for kind, in_out in _linear_types() if isinstance(module, kind)]
        if field != "weight" or not kinds or kinds[0] != use.in_out:
            return f"{target} is not the weight of an nn.Linear/Conv1D used as one"
        if calls.get(owner, 0) != 1 or _innermost(use.matmul) != owner:
            return f"{owner} is not called exactly once, as itself, on the norm's output"
    return None


def _innermost(node: torch.fx.Node) -> str | None:
    stack = node.meta.get("nn_module_stack")
    return list(stack.values())[-1][0] if stack else None


@torch.no_grad()
def _fold_into(linear: nn.Module, owner: str, norm, report: FoldReport) -> str:
    in_out = not isinstance(linear, nn.Linear)  # Conv1D, as _refusal checked
    weight, bias = fold_linear(
        linear.weight, norm.scale, norm.shift, linear.bias, centered=norm.centered, in_out=in_out
    )
    linear.weight = nn.Parameter(weight, requires_grad=linear.weight.requires_grad)
    if bias is not linear.bias:
        if linear.bias is None:
            report.params_added.append(f"{owner}.bias")
        linear.bias = nn.Parameter(bias, requires_grad=linear.weight.requires_grad)
    return f"{owner}.weight"
