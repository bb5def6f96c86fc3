"""Every "may this norm fold?" decision, in one place; the matcher only describes, this module judges.

A norm folds only if *every* user of its output is a linear layer that can take
it: a partial fold would leave the map running for the other users (saving
nothing) while adding new weights. Each refusal carries a ``SkipReason`` code.
Real norms and TaperNorms above g = 0 are reported and never touched.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.fx import Node

from taperfx.passes.match import LinearUse, Matcher, NormMap, Refusal, layer_name, normalizing_layers
from taperfx.passes.reasons import SkipReason
from taperfx.passes.report import FoldReport

__all__ = ["Plan", "plan_folds", "owned_nodes", "is_private", "bias_conflicts"]

Plan = tuple[NormMap, list[LinearUse]]
# An extra rule a caller adds (fold_module: the norm must be a module it can replace); None = no objection.
Rule = Callable[[object, NormMap, list[LinearUse]], "Refusal | None"]


def plan_folds(
    store, report: FoldReport, *, untie_shared: bool, excluded: dict[str, Refusal], rule: Rule | None = None
) -> list[Plan]:
    """Every foldable map with its linear uses, in graph order; the rest go to ``report.skipped``.

    ``excluded`` holds norms an earlier round refused after planning (a failed check),
    by name, with the code to report.
    """
    matcher = Matcher(store.tensor)
    normalizing = normalizing_layers(store.graph)
    for name, (code, detail) in normalizing.items():
        report.skip(name, code, detail)
    plans, claimed = [], set()
    for node in reversed(store.graph.nodes):
        norm = None if node in claimed else matcher.match(node)
        if norm is None or norm.name in normalizing:
            continue
        claimed.update(norm.nodes)
        uses, reasons = matcher.linear_uses(norm)
        reasons += _weight_refusals(store, uses, untie_shared)
        if not uses and not reasons:
            reasons.append((SkipReason.OUTPUT_UNUSED, "its output is not used"))
        if not reasons and norm.name in excluded:
            reasons.append(excluded[norm.name])
        if not reasons and rule is not None and (refusal := rule(store, norm, uses)) is not None:
            reasons.append(refusal)
        if reasons:
            if _looks_like_norm(norm):
                report.skip(norm.name, reasons[0][0], "; ".join(detail for _, detail in reasons))
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


def owned_nodes(uses: list[LinearUse]) -> set[Node]:
    """The consumers of a norm and the transposes between them and their stored weights."""
    return {u.matmul for u in uses} | {t for u in uses for t in u.chain}


def is_private(node: Node, uses: list[LinearUse]) -> bool:
    """True when every reader of ``node`` (through its transposes) is one of this norm's linear layers."""
    return _reads_only(node, owned_nodes(uses), {u.matmul for u in uses})


def _reads_only(node: Node, owned: set[Node], matmuls: set[Node]) -> bool:
    return all(r in owned and (r in matmuls or _reads_only(r, owned, matmuls)) for r in node.users)


def _weight_refusals(store, uses: list[LinearUse], untie_shared: bool) -> list[Refusal]:
    """Weights read by something else (unless untied by copy), or read in two layouts by this norm."""
    reasons = []
    layouts: dict[Node, set[bool]] = {}
    for use in uses:
        layouts.setdefault(use.weight, set()).add(use.in_out)
    for weight, seen in layouts.items():
        if len(seen) > 1:
            reasons.append(
                (
                    SkipReason.LAYOUT_CONFLICT,
                    f"weight {store.target(weight)} is read as (out, in) and as (in, out); "
                    "one stored tensor cannot hold both folded values",
                )
            )
        elif not untie_shared and not is_private(weight, uses):
            owned = owned_nodes(uses)
            others = ", ".join(sorted(layer_name(r) for r in weight.users if r not in owned))
            nbytes = store.tensor(weight).nbytes
            reasons.append(
                (
                    SkipReason.SHARED_WEIGHT,
                    f"weight {store.target(weight)} is shared with {others or 'another use'}; "
                    f"untie_shared=True folds into a copy (+{nbytes / 2**20:.2f} MiB)",
                )
            )
    return reasons


def bias_conflicts(store, plans: list[Plan], values: dict) -> dict[str, Refusal]:
    """Norms whose linears share one bias tensor but need different corrected values (``b + W β``).

    Each stored tensor is written once; when two uses of it disagree, the norm stays.
    """
    conflicts = {}
    for norm, uses in plans:
        wanted: dict[Node, torch.Tensor] = {}
        for use in uses:
            _, new_bias, old_bias = values[value_key(norm, use)]
            if use.bias is None or new_bias is old_bias:
                continue
            if use.bias in wanted and not torch.equal(wanted[use.bias], new_bias):
                conflicts[norm.name] = (
                    SkipReason.SHARED_BIAS_CONFLICT,
                    f"bias {store.target(use.bias)} is shared by linears with different weights; "
                    "each needs its own correction b + W β",
                )
            wanted.setdefault(use.bias, new_bias)
    return conflicts


def value_key(norm: NormMap, use: LinearUse) -> tuple:
    """What a folded value depends on: the norm (its scale and shift), the stored weight, the layout it is
    read in, and the bias. Two norms that read one linear layer (``lin(n1(x)) + lin(n2(y))``, untied by
    copy) need two folded copies of its weight."""
    return norm.output, use.weight, use.in_out, use.bias
