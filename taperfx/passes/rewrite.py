"""The fold itself, over any graph whose weights a store can read and write.

Each matched map is folded only if *every* user of its output is a linear layer
that can take it: a partial fold would leave the map running for the other users
(saving nothing) while adding new weights. A norm that stays is reported with the
reasons. Real norms and TaperNorms above g = 0 are reported and never touched.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import torch
from torch.fx import Node

from taperfx.passes.match import LinearUse, Matcher, NormMap, layer_name, normalizing_layers
from taperfx.passes.report import FoldedNorm, FoldError, FoldReport
from taperfx.passes.weights import fold_linear, one_intra_op_thread

__all__ = ["fold_graph", "plan_folds"]

aten = torch.ops.aten


def fold_graph(store, *, strict: bool = False, untie_shared: bool = False) -> FoldReport:
    """Fold every foldable gate-zero map of ``store.graph`` in place (the store holds a copy)."""
    start = time.perf_counter()
    report = FoldReport(bytes_before=store.nbytes())
    plans = plan_folds(store, report, untie_shared)
    if strict and report.skipped:
        raise FoldError(
            "strict fold: these norms cannot be folded:\n"
            + "\n".join(f"  {s.name}: {s.reason}" for s in report.skipped)
        )
    values = _folded_values(store, plans)
    for norm, uses in plans:
        weights = _fold_norm(store, norm, uses, values, report)
        report.folded.append(FoldedNorm(norm.name, norm.kind, weights))
    report.params_removed = store.prune()
    report.bytes_after = store.nbytes()
    report.seconds = time.perf_counter() - start
    return report


def plan_folds(store, report: FoldReport, untie_shared: bool) -> list[tuple[NormMap, list[LinearUse]]]:
    """Every foldable map with its linear uses, in graph order; the rest go to ``report.skipped``."""
    matcher = Matcher(store.tensor)
    normalizing = normalizing_layers(store.graph)
    for name, reason in normalizing.items():
        report.skip(name, reason)
    plans, claimed = [], set()
    for node in reversed(store.graph.nodes):
        norm = None if node in claimed else matcher.match(node)
        if norm is None or norm.name in normalizing:
            continue
        claimed.update(norm.nodes)
        uses, reasons = matcher.linear_uses(norm)
        if not untie_shared:
            reasons += _shared_weights(store, norm, uses)
        if not uses and not reasons:
            reasons.append("its output is not used")
        if reasons:
            if _looks_like_norm(norm):
                report.skip(norm.name, "; ".join(reasons))
            continue
        plans.append((norm, uses))
    return plans[::-1]


def _looks_like_norm(norm: NormMap) -> bool:
    """Report skipped maps of norm modules (or of graphs without module info), not every per-feature multiply."""
    stack = norm.output.meta.get("nn_module_stack")
    if not stack:
        return True
    kind = list(stack.values())[-1][1]
    return "norm" in (kind if isinstance(kind, str) else kind.__qualname__).lower()


def _weight_readers(uses: list[LinearUse]) -> set[Node]:
    return {u.transpose or u.matmul for u in uses} | {u.matmul for u in uses}


def _is_private(node: Node, uses: list[LinearUse]) -> bool:
    """True when every reader of ``node`` (through its transposes) is one of this norm's linear layers."""
    readers = _weight_readers(uses)
    matmuls = {u.matmul for u in uses}
    return all(r in readers and (r in matmuls or set(r.users) <= matmuls) for r in node.users)


def _shared_weights(store, norm: NormMap, uses: list[LinearUse]) -> list[str]:
    reasons = []
    for weight in dict.fromkeys(u.weight for u in uses):
        if not _is_private(weight, uses):
            others = ", ".join(sorted(layer_name(r) for r in weight.users if r not in _weight_readers(uses)))
            nbytes = store.tensor(weight).nbytes
            reasons.append(
                f"weight {store.target(weight)} is shared with {others or 'another use'}; "
                f"untie_shared=True folds into a copy (+{nbytes / 2**20:.2f} MiB)"
            )
    return reasons


def _folded_values(store, plans) -> dict[int, tuple]:
    """``(weight, bias, original bias)`` of every planned use, keyed by ``id(use)``, computed
    before any graph edit.

    Every value comes from the original tensors (nothing is written yet, so a weight
    replaced in place is never read back folded). The uses run on a pool of
    ``torch.get_num_threads()`` Python threads, with torch's own pool held to one
    thread meanwhile: each fold_linear releases the GIL in its ops, and much of a
    large fold is the kernel faulting in fresh result memory, which scales with threads.
    """

    def fold(norm: NormMap, use: LinearUse) -> tuple:
        bias = store.tensor(use.bias) if use.bias is not None else None
        value, new_bias = fold_linear(
            store.tensor(use.weight), norm.scale, norm.shift, bias, centered=norm.centered, in_out=use.in_out
        )
        return value, new_bias, bias

    jobs = [(norm, use) for norm, uses in plans for use in uses]
    with one_intra_op_thread() as threads, ThreadPoolExecutor(max_workers=threads) as pool:
        results = pool.map(lambda job: fold(*job), jobs)
        return {id(use): value for (_, use), value in zip(jobs, results)}


def _fold_norm(
    store, norm: NormMap, uses: list[LinearUse], values: dict[int, tuple], report: FoldReport
) -> tuple[str, ...]:
    graph = store.graph
    written: dict[Node, Node] = {}  # original weight node -> node holding its folded value
    for use in uses:
        value, bias_value, bias = values[id(use)]
        if use.weight not in written:  # one weight read by two of this norm's layers is folded once
            written[use.weight] = _write(store, use.weight, value, uses, report)
        _rewire_weight(graph, use, written[use.weight])
        if bias_value is not bias:
            _rewire_bias(graph, use, _write_bias(store, use, bias_value, uses, report))
        use.reader.replace_input_with(norm.output, norm.source)
    _erase_map(graph, norm)
    return tuple(store.target(n) for n in written.values())


def _write(store, node: Node, value: torch.Tensor, uses, report: FoldReport) -> Node:
    """Give ``node`` the folded value in place when only this norm reads it, else a new stored tensor."""
    if _is_private(node, uses):
        store.replace(node, value)
        return node
    new = store.add(store.target(node) + "_folded", value, node)
    report.params_added.append(store.target(new))
    return new


def _write_bias(store, use: LinearUse, value: torch.Tensor, uses, report: FoldReport) -> Node:
    if use.bias is not None:
        return _write(store, use.bias, value, uses, report)
    owner = store.target(use.weight).rpartition(".")[0]
    new = store.add(f"{owner}.bias" if owner else "bias", value, use.weight)
    report.params_added.append(store.target(new))
    return new


def _rewire_weight(graph: torch.fx.Graph, use: LinearUse, weight: Node) -> None:
    if use.transpose is None:
        use.matmul.replace_input_with(use.weight, weight)
        return
    if use.transpose.args[0] is weight:
        return
    with graph.inserting_before(use.matmul):
        transposed = graph.call_function(use.transpose.target, (weight, *use.transpose.args[1:]))
    transposed.meta.update(use.transpose.meta)
    use.matmul.replace_input_with(use.transpose, transposed)
    if not use.transpose.users:
        graph.erase_node(use.transpose)
    use.transpose = transposed


def _rewire_bias(graph: torch.fx.Graph, use: LinearUse, bias: Node) -> None:
    if use.bias is not None:
        use.matmul.replace_input_with(use.bias, bias)
    elif use.matmul.target is aten.linear.default:
        use.matmul.args = (use.matmul.args[0], use.matmul.args[1], bias)
    else:  # mm -> addmm, same output
        with graph.inserting_before(use.matmul):
            addmm = graph.call_function(aten.addmm.default, (bias, *use.matmul.args[:2]))
        addmm.meta.update(use.matmul.meta)
        use.matmul.replace_all_uses_with(addmm)
        graph.erase_node(use.matmul)
        use.matmul = addmm
    use.bias = bias


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
