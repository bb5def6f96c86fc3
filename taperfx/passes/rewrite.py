"""The graph edit of a planned fold: rewire each linear to read the norm's input, write the folded
tensors (each stored tensor once), and erase the map. Nothing here decides; ``decide`` already has.

New nodes carry ``meta["val"]`` and ``nn_module_stack`` (copied from the node they stand in for),
so later passes and the exporter's verifier see a well-formed graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx import Node

from taperfx.passes.decide import Plan, is_private, value_key
from taperfx.passes.match import LinearUse, NormMap
from taperfx.passes.report import FoldedNorm, FoldReport

__all__ = ["EditedUse", "apply_plans"]

aten = torch.ops.aten


@dataclass(frozen=True)
class EditedUse:
    """Where a linear layer reads its folded weight and bias after the edit, and the node of its result."""

    weight: Node
    bias: Node | None
    output: Node


def apply_plans(store, plans: list[Plan], values: dict, report: FoldReport) -> dict[int, EditedUse]:
    """Edit ``store.graph`` for every plan; returns ``{id(use): EditedUse}`` for the checks."""
    edited = {}
    for norm, uses in plans:
        edited.update(_fold_norm(store, norm, uses, values, report))
    return edited


def _fold_norm(store, norm: NormMap, uses: list[LinearUse], values: dict, report: FoldReport) -> dict:
    graph = store.graph
    for use in uses:  # first, before any consumer node is replaced: each reader now reads the map's input
        use.reader.replace_input_with(norm.output, norm.source)
        _free_views(use)
    for check in list(norm.output.users):  # what is left are export's metadata asserts (see Matcher._collect)
        check.replace_input_with(norm.output, norm.source)
    weights: dict[tuple, Node] = {}  # (stored weight, layout) -> node holding its folded value
    biases: dict[Node, Node] = {}  # stored bias -> node holding its folded value
    edited = {}
    for use in uses:
        value, bias_value, bias = values[value_key(norm, use)]
        key = (use.weight, use.in_out)
        if key not in weights:
            weights[key] = _write(store, use.weight, value, uses, report)
        _rewire_weight(graph, use, weights[key])
        output, bias_node = use.matmul, use.bias
        if bias_value is not bias:
            if use.bias is None:
                bias_node = _new_bias(store, use, bias_value, report)
                output = _add_bias(graph, use.matmul, bias_node)
            else:
                if use.bias not in biases:
                    biases[use.bias] = _write(store, use.bias, bias_value, uses, report)
                bias_node = biases[use.bias]
                use.matmul.replace_input_with(use.bias, bias_node)
        edited[id(use)] = EditedUse(weights[key], bias_node, output)
    _erase_map(graph, norm)
    report.folded.append(
        FoldedNorm(norm.name, norm.kind, tuple(dict.fromkeys(store.target(n) for n in weights.values())))
    )
    return edited


def _free_views(use: LinearUse) -> None:
    """Turn every ``view`` between the map's input and the consumer into ``reshape`` (same values).

    A ``view`` needs strides it can reinterpret. It read the map's output, a fresh tensor; it now
    reads the map's input, which may be any slice or transpose (``norm(x[:, 1:]).view(-1, d)``, or
    a non-contiguous tensor handed to the program): ``reshape`` is that view whenever the strides
    allow one, and a copy otherwise, where ``view`` would raise.
    """
    for node in use.views:
        node.target = aten.reshape.default


def _write(store, node: Node, value: torch.Tensor, uses: list[LinearUse], report: FoldReport) -> Node:
    """Give ``node`` the folded value in place when only this norm reads it, else a new stored tensor."""
    if is_private(node, uses):
        store.replace(node, value)
        return node
    new = store.add(store.target(node) + "_folded", value, node)
    report.params_added.append(store.target(new))
    return new


def _new_bias(store, use: LinearUse, value: torch.Tensor, report: FoldReport) -> Node:
    owner = store.target(use.weight).rpartition(".")[0]
    new = store.add(f"{owner}.bias" if owner else "bias", value, use.weight)
    report.params_added.append(store.target(new))
    return new


def _rewire_weight(graph: torch.fx.Graph, use: LinearUse, weight: Node) -> None:
    """Point the consumer at ``weight`` through a fresh copy of its transposes (others may share the old ones)."""
    if weight is use.weight:
        return
    read = use.chain[-1] if use.chain else use.weight
    current = weight
    with graph.inserting_before(use.matmul):
        for transpose in use.chain:
            current = graph.call_function(transpose.target, (current, *transpose.args[1:]), dict(transpose.kwargs))
            current.meta.update(transpose.meta)
    use.matmul.replace_input_with(read, current)
    for transpose in reversed(use.chain):
        if not transpose.users:
            graph.erase_node(transpose)


def _add_bias(graph: torch.fx.Graph, matmul: Node, bias: Node) -> Node:
    """The node computing ``matmul + bias`` in place of ``matmul`` (same value, same shape); returns it."""
    if matmul.target is aten.linear.default:
        matmul.args = (matmul.args[0], matmul.args[1], bias)
        return matmul
    if matmul.target is aten.mm.default:  # mm -> addmm, same output
        with graph.inserting_before(matmul):
            new = graph.call_function(aten.addmm.default, (bias, *matmul.args[:2]))
        new.meta.update(matmul.meta)
        matmul.replace_all_uses_with(new)
        graph.erase_node(matmul)
        return new
    with graph.inserting_after(matmul):  # matmul: add the bias to its result
        new = graph.call_function(aten.add.Tensor, (matmul, bias))
    new.meta.update(matmul.meta)
    matmul.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)
    return new


def _erase_map(graph: torch.fx.Graph, norm: NormMap) -> None:
    """Erase the map's nodes, then the arithmetic that only computed its constants."""
    inputs = []
    for node in reversed(norm.nodes):
        inputs += [a for a in node.all_input_nodes if a not in norm.nodes]
        graph.erase_node(node)
    while inputs:
        node = inputs.pop()
        if node.op == "call_function" and not node.users and node.target in (aten.mul.Tensor, aten.mul.Scalar):
            inputs += node.all_input_nodes
            graph.erase_node(node)
