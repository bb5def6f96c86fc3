"""``fold_module``: the fold on an eager model (the paper's "fused" decoding in plain PyTorch).

Which linear layers read a norm is a property of ``forward``, not of the module
tree, so the model is traced with ``torch.export`` on example inputs and the same
pipeline as ``fold`` (planner, float64 values, local checks) runs on that graph;
the folded tensors it checked are then put into the module. A TaperNorm becomes
an identity only when the trace proves all of this:

- the TaperNorm sits at g = 0 and is called exactly once;
- every user of its output is a call of an ``nn.Linear`` (or Hugging Face
  ``Conv1D``) module on that output, with the module's own weight, and each such
  module is called exactly once in the whole forward;
- nothing but its own forward reads its parameters (``nn.TransformerEncoderLayer``'s
  inference fast path reads ``norm1.weight`` directly: such norms stay, code
  ``read_outside_forward``).

Other call paths: see ``taperfx.passes.guard``. With ``guard_calls=True`` (the
default) a call that does not follow the traced order of folded norms and their
linears raises ``FoldError`` (code ``untraced_call_path``) instead of computing
wrong values; ``guard_calls=False`` leaves plain ``nn.Identity`` modules (faster,
compiles without graph breaks; a ``ContiguousIdentity`` where the forward views the
norm's output) and the caller vouches for every other path.
"""

from __future__ import annotations

import copy
from collections import defaultdict

import torch
from torch import nn

from taperfx.norms import TaperNorm
from taperfx.passes.guard import install_guard
from taperfx.passes.match import LinearUse, NormMap, layer_name
from taperfx.passes.pipeline import Folded, run_pipeline
from taperfx.passes.program import verify_fold
from taperfx.passes.reasons import SkipReason
from taperfx.passes.report import FoldReport
from taperfx.passes.stores import ProgramStore

__all__ = ["ContiguousIdentity", "fold_module"]

# Modules whose forward reads their norms' parameters itself (PyTorch's fused inference fast path).
_READS_NORMS_ITSELF = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)


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


def _read_outside_forward(model: nn.Module, program) -> set[str]:
    """Norms whose parameters something other than their own forward reads: by parent type (fast paths
    the trace never sees) and by the trace (a parameter read by a node outside the norm's module)."""
    found = set()
    for path, module in model.named_modules():
        if isinstance(module, _READS_NORMS_ITSELF):
            found |= {f"{path}.{name}".lstrip(".") for name, child in module.named_children() if _is_norm(child)}
    targets = {spec.arg.name: spec.target for spec in program.graph_signature.input_specs if spec.target}
    for node in program.graph.nodes:
        owner = targets.get(node.name, "").rpartition(".")[0] if node.op == "placeholder" else ""
        if owner and _is_norm(model.get_submodule(owner)):
            for user in node.users:
                paths = [p for p, _ in (user.meta.get("nn_module_stack") or {}).values()]
                if owner not in paths:
                    found.add(owner)
    return found


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (TaperNorm, nn.LayerNorm, nn.RMSNorm))


def fold_module(
    model: nn.Module,
    example_args: tuple,
    example_kwargs: dict | None = None,
    *,
    strict: bool = False,
    untie_shared: bool = False,
    verify: bool = True,
    guard_calls: bool = True,
) -> tuple[nn.Module, FoldReport]:
    """A copy of ``model`` with its gate-zero TaperNorms folded into the following linear layers.

    ``example_args``/``example_kwargs`` drive one trace (see the module docstring for
    the rule and for ``guard_calls``). ``strict``, ``untie_shared`` and ``verify``
    mean what they mean for ``fold``; ``verify`` compares the folded module with
    ``model`` on the example inputs. ``model`` is not modified.
    """
    model = copy.deepcopy(model)
    with torch.no_grad():
        program = torch.export.export(model, tuple(example_args), example_kwargs, strict=False)
    rule = _ModuleRule(model, _call_counts(program.graph), _read_outside_forward(model, program))
    result = run_pipeline(lambda: ProgramStore(program), strict=strict, untie_shared=untie_shared, rule=rule)
    folded = _apply(model, result)
    if guard_calls and result.plans:
        viewed = {norm.name: _viewed(uses) for norm, uses in result.plans}
        install_guard(folded, _traced_order(program.graph, result.plans), viewed)
    if verify and result.plans:
        original = program.module()  # the traced original: the reference the folded module must match
        verify_fold(original, folded, example_args, example_kwargs, result.report, reference=original)
    return folded, result.report


class _ModuleRule:
    """fold_module's own refusals: the map must be a replaceable TaperNorm feeding whole Linear modules."""

    def __init__(self, model: nn.Module, calls: dict[str, int], read_outside: set[str]) -> None:
        self.modules = dict(model.named_modules())
        self.calls = calls
        self.read_outside = read_outside

    def __call__(self, store, norm: NormMap, uses: list[LinearUse]):
        module = self.modules.get(norm.name)
        if not isinstance(module, TaperNorm):
            return SkipReason.NOT_A_MODULE_NORM, "the map is not a TaperNorm module's output: no module to replace"
        if module.gate_value != 0.0:
            return SkipReason.GATE_ABOVE_ZERO, f"gate is {module.gate_value:g}, not 0"
        if self.calls.get(norm.name, 0) != 1:
            count = self.calls.get(norm.name, 0)
            return SkipReason.CALLED_MORE_THAN_ONCE, f"called {count} times; identity would change every call"
        if norm.name in self.read_outside:
            return (
                SkipReason.READ_OUTSIDE_FORWARD,
                f"its parent reads {norm.name}'s parameters outside the norm's forward (a fused fast path)",
            )
        for use in uses:
            owner = layer_name(use.matmul)
            linear = self.modules.get(owner)
            kinds = [in_out for kind, in_out in _linear_types() if isinstance(linear, kind)]
            if (
                not kinds
                or kinds[0] != use.in_out
                or use.chain
                or store.target(use.weight) != f"{owner}.weight"
                or (use.bias is not None and store.target(use.bias) != f"{owner}.bias")
                or self.calls.get(owner, 0) != 1
            ):
                return (
                    SkipReason.NOT_A_LINEAR_MODULE,
                    f"{use.matmul.name} is not an nn.Linear/Conv1D called once, as itself, on the norm's output",
                )
        return None


def _traced_order(graph: torch.fx.Graph, plans) -> list[str]:
    """The folded norms and their linear layers, in the order the trace first entered each."""
    watched = {norm.name for norm, _ in plans} | {layer_name(u.matmul) for _, uses in plans for u in uses}
    order = []
    for node in graph.nodes:
        for path, _ in (node.meta.get("nn_module_stack") or {}).values():
            if path in watched and path not in order:
                order.append(path)
    return order


class ContiguousIdentity(nn.Identity):
    """Stands where a folded norm was when the forward views its output (``h.view(-1, d)``): the norm
    returned a fresh tensor any view can read, its input may be a slice none can; ``contiguous()`` is
    free when the input already is."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return input.contiguous()


def _viewed(uses: list[LinearUse]) -> bool:
    return any(use.views for use in uses)


@torch.no_grad()
def _apply(model: nn.Module, result: Folded) -> nn.Module:
    """Put the checked, folded tensors into ``model``'s linear layers and replace each folded norm by identity.

    The report's ``params_added`` become the module's new parameters (biases a linear did not have); a
    weight untied from an embedding is the linear's own weight now, not an added parameter.
    """
    store, added = result.store, []
    for norm, uses in result.plans:
        for use in uses:
            edited = result.edited[id(use)]
            linear = model.get_submodule(layer_name(use.matmul))
            requires_grad = linear.weight.requires_grad
            linear.weight = nn.Parameter(store.tensor(edited.weight), requires_grad=requires_grad)
            if edited.bias is not None:
                if linear.bias is None:
                    added.append(f"{layer_name(use.matmul)}.bias")
                linear.bias = nn.Parameter(store.tensor(edited.bias), requires_grad=requires_grad)
        parent, _, child = norm.name.rpartition(".")
        setattr(model.get_submodule(parent), child, ContiguousIdentity() if _viewed(uses) else nn.Identity())
    result.report.params_added = added
    return model
