"""``torch.compile(model, backend="taperfx")``: Inductor with gate-zero norms folded into the weights.

Registered through the ``torch_dynamo_backends`` entry point (pyproject.toml), so
torch finds it by name without importing taperfx first; ``mode`` and ``options``
mean what they mean for ``backend="inductor"``.

Why the detour through freezing: Dynamo inlines the modules, so parameters and
buffers arrive as graph inputs. Folding ``W' = W·diag(s)`` on such a graph would
recompute ``W * s`` on every call, which costs more than the norm it removes. So,
in inference (no gradients wanted), the backend

1. turns the inputs that hold module parameters and buffers back into module
   attributes, so AOTAutograd sees them as parameters again;
2. compiles with Inductor's ``freezing=True``, which makes them constants of the
   aten-level graph (the compiled code keeps the values they had at compile time,
   Inductor's own contract for freezing);
3. folds that frozen graph once, at compile time, in a post-grad pass: the folded
   weights are plain constants and no per-call work is left.

CPU weight pre-packing is turned off when folding, because it hides the weights
in opaque MKLDNN tensors before post-grad passes run. With gradients wanted, or
no TaperNorm in the graph, it goes to Inductor exactly as ``backend="inductor"``
would send it; a TaperNorm whose gate is not 0 is frozen but left unfolded.
"""

from __future__ import annotations

import logging
import operator
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import fx

import taperfx.passes
from taperfx.export._compat import (
    CustomGraphPass,
    get_hash_for_files,
    inductor_compile,
    inductor_mode_options,
    inductor_option_names,
    is_module_state,
)
from taperfx.norms import TaperNorm
from taperfx.passes.pipeline import run_pipeline
from taperfx.passes.stores import GraphStore

__all__ = ["taperfx_backend", "freeze_module_state", "FoldNormsPass", "inductor_config"]

log = logging.getLogger(__name__)


class FoldNormsPass(CustomGraphPass):
    """Inductor post-grad pass: fold the gate-zero norms of a frozen graph, in place.

    The graph belongs to Inductor and is edited where it is (no copy, no re-splicing), through the
    same pipeline as ``taperfx.fold``: every rewritten linear is checked against the original nodes
    on float64 probes. A norm whose check fails is left unfolded: the graph is brought back to its
    state before the fold (a copy of the nodes, never of the weights, is kept for that) and folded
    again without it.
    """

    def __call__(self, graph: fx.Graph) -> None:
        store = GraphStore(graph.owning_module)
        saved = None

        def fresh_store() -> GraphStore:
            nonlocal saved
            if saved is None:
                saved = store.restore_point()
            else:
                store.restore(saved)
            return store

        result = run_pipeline(fresh_store)
        result.store.result()
        log.info("taperfx backend: %s", result.report)

    def uuid(self) -> bytes:
        # Inductor's FX graph cache keys on this: any change to the fold code must miss the cache.
        sources = sorted(Path(taperfx.passes.__file__).parent.glob("*.py")) + [Path(__file__)]
        return get_hash_for_files(tuple(str(p) for p in sources))


def inductor_config(mode: str | None, options: dict[str, Any] | None) -> dict[str, Any]:
    """``mode`` and ``options`` resolved to Inductor config patches, as ``torch.compile`` resolves them for Inductor."""
    config = inductor_mode_options(mode) if mode and mode != "default" else {}
    options = {k.replace("-", "_"): v for k, v in (options or {}).items()}
    unknown = set(options) - inductor_option_names()
    if unknown:
        raise ValueError(f"unknown Inductor option(s) {sorted(unknown)}; see torch._inductor.list_options()")
    if "post_grad_custom_pre_pass" in options:
        raise ValueError(
            "the taperfx backend installs its own post_grad_custom_pre_pass; use post_grad_custom_post_pass"
        )
    return {**config, **options}


def _writes_into(node: fx.Node) -> bool:
    """Whether a user of ``node`` mutates it (in-place ops end in ``_`` by torch convention; or ``x[i] = v``)."""
    for user in node.users:
        name = user.target if user.op == "call_method" else getattr(user.target, "__name__", "")
        if user.args and user.args[0] is node and (user.target is operator.setitem or str(name).endswith("_")):
            return True
    return False


def freeze_module_state(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> tuple[fx.GraphModule, list[int]]:
    """A copy of ``gm`` whose inputs holding module parameters or buffers are module attributes instead.

    Returns it with the positions, in ``example_inputs``, of the inputs it still
    takes. Buffers the graph writes into (a static KV cache) stay inputs.
    """
    gm = fx.GraphModule(gm, gm.graph.__deepcopy__())
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(example_inputs):
        raise ValueError(f"graph has {len(placeholders)} inputs but {len(example_inputs)} example inputs were given")
    runtime: list[int] = []
    for index, (node, value) in enumerate(zip(placeholders, example_inputs)):
        if not (isinstance(value, torch.Tensor) and is_module_state(value)) or _writes_into(node):
            runtime.append(index)
            continue
        name = f"_frozen_{node.name}"
        gm.register_buffer(name, value.detach())
        with gm.graph.inserting_before(node):
            attribute = gm.graph.get_attr(name)
        attribute.meta = dict(node.meta)
        node.replace_all_uses_with(attribute)
        gm.graph.erase_node(node)
    gm.recompile()
    return gm, runtime


def _traces_tapernorm(gm: fx.GraphModule) -> bool:
    """Whether any node of the graph comes from a TaperNorm module (Dynamo records the module stack)."""
    return any(
        isinstance(module_type, type) and issubclass(module_type, TaperNorm)
        for node in gm.graph.nodes
        for _, module_type in node.meta.get("nn_module_stack", {}).values()
    )


def taperfx_backend(
    gm: fx.GraphModule, example_inputs: Sequence[Any], *, mode: str | None = None, options: dict[str, Any] | None = None
) -> Callable:
    """Dynamo backend: fold gate-zero TaperNorms into the linears they feed, then compile with Inductor."""
    config = inductor_config(mode, options)
    wants_gradients = torch.is_grad_enabled() and any(
        isinstance(x, torch.Tensor) and x.requires_grad for x in example_inputs
    )
    if wants_gradients or not _traces_tapernorm(gm):
        return inductor_compile(gm, list(example_inputs), config)
    frozen, runtime = freeze_module_state(gm, example_inputs)
    config.update({"freezing": True, "cpp.weight_prepack": False, "post_grad_custom_pre_pass": FoldNormsPass()})
    compiled = inductor_compile(frozen, [example_inputs[i] for i in runtime], config)
    return lambda *args: compiled(*(args[i] for i in runtime))
