"""``torch.compile(model, backend="taperfx")``: fold gate-zero norms, then compile with Inductor.

Registered through the ``torch_dynamo_backends`` entry point (pyproject.toml), so
torch finds it by name without importing taperfx first.

Dynamo hands over a graph of torch-level ops whose parameters and buffers arrive
as graph inputs (modules are inlined). Folding ``W' = W·diag(s)`` on such a graph
would recompute ``W * s`` on every call, which costs more than the norm it
removes. So, for inference, the backend first freezes the module's parameters and
buffers into constants of the graph (the same contract as Inductor's
``freezing=True``: the compiled code keeps the values they had when it was
compiled), folds once, at compile time, and gives Inductor a graph whose folded
weights are plain constants. Only the true runtime inputs stay arguments.

Nothing is frozen when there is nothing to fold (a baseline model, a gate that is
not 0) or when gradients are wanted (a training step must see live parameters):
the graph then goes to Inductor exactly as ``backend="inductor"`` would send it.
"""

from __future__ import annotations

import operator
from typing import Any, Callable, Sequence

import torch
import torch._inductor
from torch import fx

from taperfx.passes import fold_graph_module
from taperfx.passes._compat import is_module_state_input

__all__ = ["taperfx_backend", "freeze_module_state"]


def _inductor_options(mode: str | None, options: dict[str, Any] | None) -> dict[str, Any]:
    """``mode`` and ``options`` resolved to Inductor config patches, as ``torch.compile`` does for Inductor."""
    resolved = dict(torch._inductor.list_mode_options(mode)) if mode and mode != "default" else {}
    unknown = set(options or {}) - set(torch._inductor.list_options())
    if unknown:
        raise ValueError(f"unknown Inductor option(s) {sorted(unknown)}; see torch._inductor.list_options()")
    resolved.update(options or {})
    return resolved


def _mutates(node: fx.Node) -> bool:
    """Whether some user of ``node`` writes into it (in-place ops end in ``_`` by torch convention)."""
    for user in node.users:
        target = user.target if user.op == "call_method" else getattr(user.target, "__name__", "")
        if user.args and user.args[0] is node and (target == operator.setitem.__name__ or str(target).endswith("_")):
            return True
    return False


def freeze_module_state(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> tuple[fx.GraphModule, list[int]]:
    """Turn the graph inputs that hold module parameters or buffers into constants (get_attr).

    Returns a new GraphModule and the positions, in the original input list, of
    the inputs it still takes. Buffers the graph writes into stay inputs.
    """
    gm = fx.GraphModule(gm, gm.graph.__deepcopy__())
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(example_inputs):
        raise ValueError(f"graph has {len(placeholders)} inputs but {len(example_inputs)} example inputs were given")
    runtime: list[int] = []
    for index, (node, value) in enumerate(zip(placeholders, example_inputs)):
        if not (isinstance(value, torch.Tensor) and is_module_state_input(value)) or _mutates(node):
            runtime.append(index)
            continue
        name = f"_frozen_{node.name}"
        gm.register_buffer(name, value.detach())
        with gm.graph.inserting_before(node):
            constant = gm.graph.get_attr(name)
        constant.meta = dict(node.meta)
        node.replace_all_uses_with(constant)
        gm.graph.erase_node(node)
    gm.recompile()
    return gm, runtime


def _wants_gradients(example_inputs: Sequence[Any]) -> bool:
    return torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad for x in example_inputs)


def taperfx_backend(
    gm: fx.GraphModule, example_inputs: Sequence[Any], *, mode: str | None = None, options: dict[str, Any] | None = None
) -> Callable:
    """Dynamo backend: fold gate-zero TaperNorms into their consumers, then Inductor with ``mode``/``options``."""
    config = _inductor_options(mode, options)
    if not _wants_gradients(example_inputs):
        frozen, runtime = freeze_module_state(gm, example_inputs)
        folded, report = fold_graph_module(frozen)
        if report.folded:
            compiled = torch._inductor.compile(folded, [example_inputs[i] for i in runtime], options=config)
            return lambda *args: compiled(*(args[i] for i in runtime))
    return torch._inductor.compile(gm, list(example_inputs), options=config)
