"""The one fold pipeline behind ``fold_program``, ``fold_graph_module``, ``fold_module`` and the compile backend.

plan (``decide``) → capture the original nodes on probes (``check``) → folded values
(``values``, float64, each stored tensor once) → edit (``rewrite``) → check every
rewritten consumer against its original. A norm whose check fails is planned
again as skipped (code ``check_failed``) on a fresh store, so the returned graph
contains only rewrites that passed; under ``strict=True`` it raises instead.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from taperfx.passes import check
from taperfx.passes.decide import Plan, Rule, bias_conflicts, plan_folds
from taperfx.passes.inplace import folded_values_in_place
from taperfx.passes.reasons import SkipReason
from taperfx.passes.report import FoldError, FoldReport
from taperfx.passes.rewrite import EditedUse, apply_plans
from taperfx.passes.values import folded_values

__all__ = ["Folded", "run_pipeline"]


@dataclass
class Folded:
    """What the pipeline leaves: the edited store, the report, the plans that folded and where each use reads now."""

    store: object
    report: FoldReport
    plans: list[Plan]
    edited: dict[int, EditedUse]


def run_pipeline(
    make_store: Callable[[], object],
    *,
    strict: bool = False,
    untie_shared: bool = False,
    rule: Rule | None = None,
    inplace: bool = False,
) -> Folded:
    """Fold the store ``make_store()`` returns (edited in place); ``rule`` adds a caller's refusals.

    ``make_store`` is called again, for a fresh store, when a check fails. With
    ``inplace=True`` the folded weights are written into the store's own tensors
    (``inplace.folded_values_in_place``); the originals are then gone, so a failed
    check raises FoldError instead of planning again.
    """
    start = time.perf_counter()
    excluded: dict = {}
    while True:
        store = make_store()
        report = FoldReport(bytes_before=store.nbytes())
        plans = plan_folds(store, report, untie_shared=untie_shared, excluded=excluded, rule=rule)
        _raise_if_strict(strict, report)  # before any value: in place, a value overwrites the original
        probes = _capture(store, plans, report)  # before any value is computed: a value may be written in place
        values = (folded_values_in_place if inplace else folded_values)(store, plans)
        conflicts = bias_conflicts(store, plans, values)
        for norm, _ in plans:
            if norm.name in conflicts:
                report.skip(norm.name, *conflicts[norm.name])
        plans = [(norm, uses) for norm, uses in plans if norm.name not in conflicts]
        probes = [probe for probe in probes if probe.norm.name not in conflicts]
        _raise_if_strict(strict, report)
        edited, failures = _edit_and_check(store, plans, values, probes, report)
        if not failures:
            break
        if inplace:
            lines = "; ".join(f"{n}: {d}" for n, (_, d) in failures.items())
            raise FoldError(
                f"in-place fold: a rewritten layer failed its check and the originals are gone ({lines})",
                code=SkipReason.CHECK_FAILED,
            )
        excluded.update(failures)
        _raise_if_strict(strict, report, failures)
    report.params_removed = store.prune()
    report.bytes_after = store.nbytes()
    report.seconds = time.perf_counter() - start
    return Folded(store, report, plans, edited)


def _capture(store, plans: list[Plan], report: FoldReport) -> list[check.Probe]:
    """The original nodes of every plan interpreted on its probe, while every tensor is still the original."""
    t0 = time.perf_counter()
    probes = [check.capture(store, norm, uses, seed=i) for i, (norm, uses) in enumerate(plans)]
    report.check_seconds += time.perf_counter() - t0
    return probes


def _edit_and_check(store, plans: list[Plan], values: dict, probes: list, report: FoldReport) -> tuple[dict, dict]:
    """Apply the plans and check each; returns the edits and ``{norm name: refusal}`` for failed checks."""
    edited = apply_plans(store, plans, values, report)
    t0 = time.perf_counter()
    failures = {}
    for probe in probes:
        problem = check.confirm(store, probe, [edited[id(use)] for use in probe.uses])
        if problem is not None:
            failures[probe.norm.name] = (SkipReason.CHECK_FAILED, problem)
        report.layers_checked += len(probe.uses)
    report.check_seconds += time.perf_counter() - t0
    return edited, failures


def _raise_if_strict(strict: bool, report: FoldReport, failures: dict | None = None) -> None:
    lines = [str(s) for s in report.skipped] + [f"{n}: [{c.value}] {d}" for n, (c, d) in (failures or {}).items()]
    if strict and lines:
        code = next(iter(failures.values()))[0] if failures else report.skipped[0].code
        raise FoldError("strict fold: these norms cannot be folded:\n" + "\n".join(f"  {x}" for x in lines), code=code)
