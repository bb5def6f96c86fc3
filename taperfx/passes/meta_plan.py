"""Plan a fold on a weightless program: the matcher runs on an export of a meta-device model.

A model built on the meta device exports like a real one (shapes, dtypes, the
graph), but holds no weight memory. The matcher needs values only for the small
stored vectors a map is made of (``c``, ``γ̃``, ``β``) and the biases it corrects;
``MetaStore`` loads exactly those (tensors of at most one dimension) through a
caller's ``load(name)`` and gives the matcher the meta tensor of every weight,
whose shape is all it checks. The result is a ``FoldPlan`` naming checkpoint keys,
which ``taperfx.passes.stream`` applies to the shards.

Which norm folds, into what, and which refuse, is decided by the same planner as
``fold`` (``plan_folds``); this module only reads its answer into plain data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch.export import ExportedProgram
from torch.fx import Node

from taperfx.passes.decide import is_private, plan_folds
from taperfx.passes.fold_plan import BiasSpec, FoldPlan, MapSpec, WeightSpec
from taperfx.passes.match import layer_name
from taperfx.passes.reasons import SkipReason
from taperfx.passes.report import FoldedNorm, FoldReport
from taperfx.passes.stores import ProgramStore

__all__ = ["MetaStore", "plan_from_program"]


class MetaStore(ProgramStore):
    """A ProgramStore whose weights are meta tensors; vectors (≤ 1-D) come from ``load(name)`` instead."""

    def __init__(self, program: ExportedProgram, load: Callable[[str], torch.Tensor]) -> None:
        super().__init__(program)
        self._load = load
        self._loaded: dict[str, torch.Tensor] = {}

    def tensor(self, node: Node) -> torch.Tensor | None:
        value = super().tensor(node)
        if value is None or value.device.type != "meta" or value.dim() > 1:
            return value
        name = self.target(node)
        if name not in self._loaded:
            loaded = self._load(name)
            if tuple(loaded.shape) != tuple(value.shape):
                raise ValueError(f"{name}: the checkpoint holds shape {tuple(loaded.shape)}, the model {value.shape}")
            self._loaded[name] = loaded
        return self._loaded[name]


def plan_from_program(
    program: ExportedProgram,
    load: Callable[[str], torch.Tensor],
    *,
    source: Callable[[str], str],
    target: Callable[[str], str],
    untie_shared: bool = False,
) -> tuple[FoldPlan, FoldReport]:
    """The fold plan of ``program`` (a meta-device export) and its report.

    - ``load(name)``: the real value of the program's stored tensor ``name`` (only ≤ 1-D ones are asked for).
    - ``source(name)``: the key under which the input checkpoint holds the program's tensor ``name``.
    - ``target(name)``: the key the output checkpoint gives the program's tensor ``name`` (e.g. the
      canonical name of a tied tensor). New tensors are named by module path: ``<layer>.weight``/``.bias``.
    - ``untie_shared``: fold a weight other layers also read into a new tensor named after the layer
      (``<layer>.weight``), as ``fold(untie_shared=True)``; otherwise that norm stays, reported.

    Every stored tensor under a folded norm's module path is dropped; every other one is kept.
    """
    store = MetaStore(program, load)
    report = FoldReport()
    plans = plan_folds(store, report, untie_shared=untie_shared, excluded={})
    plan = FoldPlan()
    rewritten: set[str] = set()
    taken = {target(name) for name in program.state_dict}  # every key the output may already hold
    for norm, uses in plans:
        specs = _norm_specs(store, norm, uses, len(plan.maps), source, target)
        clash = sorted(set(specs.new_keys) & taken)
        if clash:
            report.skip(
                norm.name,
                SkipReason.CALLED_MORE_THAN_ONCE,
                f"its folded copy would be stored as {clash}, a key another reader of that layer keeps or another "
                "fold writes; a checkpoint holds one weight per layer",
            )
            continue
        taken.update(specs.new_keys)
        rewritten.update(specs.rewritten)
        plan.maps.append(specs.map)
        plan.weights += specs.weights
        plan.biases += specs.biases
        report.folded.append(FoldedNorm(norm.name, norm.kind, tuple(w.target for w in specs.weights)))
    norms = tuple(m.name + "." for m in plan.maps)
    for name in program.state_dict:
        if name not in rewritten and not name.startswith(norms):
            plan.keys[source(name)] = target(name)
    report.params_removed = sorted(name for name in program.state_dict if name.startswith(norms))
    plan.check()
    return plan, report


@dataclass
class _NormSpecs:
    """What folding one norm writes: its map, weights and biases, the program tensors it rewrites where they
    are, and the keys it adds to the checkpoint (copies of shared weights, biases a layer lacked)."""

    map: MapSpec
    weights: list[WeightSpec] = field(default_factory=list)
    biases: list[BiasSpec] = field(default_factory=list)
    rewritten: set[str] = field(default_factory=set)
    new_keys: list[str] = field(default_factory=list)


def _norm_specs(store, norm, uses, index: int, source: Callable, target: Callable) -> _NormSpecs:
    """The specs of folding ``norm`` into ``uses`` as map ``index`` of the plan."""
    scale = tuple(norm.scale.tolist())
    shift = None if norm.shift is None else tuple(norm.shift.tolist())
    specs = _NormSpecs(MapSpec(norm.name, norm.centered, scale, shift))
    written: dict[str, str] = {}
    bias_targets: dict[str, str] = {}
    for use in uses:
        name = store.target(use.weight)
        copy = not is_private(use.weight, uses)
        owner = layer_name(use.matmul) if copy else name.rpartition(".")[0]
        if name not in written:
            written[name] = f"{owner}.weight" if copy else target(name)
            specs.weights.append(WeightSpec(source(name), written[name], index, use.in_out))
            if copy:
                specs.new_keys.append(written[name])
            else:
                specs.rewritten.add(name)
        if norm.shift is None:
            continue
        bias = None if use.bias is None else store.target(use.bias)
        out = target(bias) if bias is not None and not copy else f"{owner}.bias"
        if bias_targets.get(out) == name:
            continue  # this weight's bias is already corrected (one layer read twice)
        bias_targets[out] = name
        if bias is not None and not copy:
            specs.rewritten.add(bias)
        else:
            specs.new_keys.append(out)
        specs.biases.append(BiasSpec(None if bias is None else source(bias), out, source(name), index, use.in_out))
    return specs
