"""A fold plan: which norm folds into which stored tensors, named by checkpoint keys, without weights.

The plan is what the matcher decided, reduced to plain data so that it can be
computed on a weightless (meta) program, written to JSON, and applied later to a
checkpoint on disk one tensor at a time (``taperfx.passes.stream``). It holds only
the small vectors of each map (``s = c·γ̃`` and ``β``, float64), never a weight.

- ``maps``: one entry per folded norm: its module name, whether it centers (LN),
  its scale and shift.
- ``weights``: every weight to rewrite: the checkpoint key it is read from, the
  key it is written to (the same key, or a new one for a folded copy of a weight
  that is also used unfolded, as a tied embedding), its layout, its map.
- ``biases``: every bias the fold changes or adds (``b + W β``): the key of the
  bias it starts from (None: a new bias), the key to write, and the weight (by
  source key) whose original rows give ``W β``.
- ``keys``: every source key the output keeps, with its output key (the same, or
  renamed); a source key not listed is dropped (the norms' own parameters).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import torch

__all__ = ["MapSpec", "WeightSpec", "BiasSpec", "FoldPlan"]


@dataclass(frozen=True)
class MapSpec:
    name: str
    centered: bool
    scale: tuple[float, ...]
    shift: tuple[float, ...] | None

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(scale, shift)`` as float64 tensors."""
        shift = None if self.shift is None else torch.tensor(self.shift, dtype=torch.float64)
        return torch.tensor(self.scale, dtype=torch.float64), shift


@dataclass(frozen=True)
class WeightSpec:
    source: str
    target: str
    map: int  # index into FoldPlan.maps
    in_out: bool  # stored (in, out), as x @ W


@dataclass(frozen=True)
class BiasSpec:
    source: str | None
    target: str
    weight: str  # source key of the weight whose original rows give W β
    map: int
    in_out: bool


@dataclass
class FoldPlan:
    maps: list[MapSpec] = field(default_factory=list)
    weights: list[WeightSpec] = field(default_factory=list)
    biases: list[BiasSpec] = field(default_factory=list)
    keys: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Refuse a plan that would write one output key twice or read a key it does not keep or fold."""
        targets = [w.target for w in self.weights] + [b.target for b in self.biases]
        written = set(targets)
        if len(written) != len(targets):
            twice = sorted({t for t in targets if targets.count(t) > 1})
            raise ValueError(f"fold plan writes {twice} more than once (a tensor shared by two folds)")
        kept = set(self.keys.values())
        if written & kept:
            raise ValueError(f"fold plan both keeps and writes {sorted(written & kept)}")
        folded = {w.source for w in self.weights}
        for spec in [*self.weights, *self.biases]:
            if not 0 <= spec.map < len(self.maps):
                raise ValueError(f"fold plan: {spec.target} names map {spec.map}, the plan has {len(self.maps)}")
        for bias in self.biases:
            if bias.weight not in folded:
                raise ValueError(f"fold plan: bias {bias.target} is corrected by {bias.weight}, which it does not fold")

    def output_keys(self) -> dict[str, str]:
        """``{output key: source key whose shard holds it}`` for every tensor of the folded checkpoint."""
        out = {target: source for source, target in self.keys.items()}
        out.update({w.target: w.source for w in self.weights})
        out.update({b.target: b.source if b.source is not None else b.weight for b in self.biases})
        return out

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "FoldPlan":
        data = json.loads(text)
        maps = [
            MapSpec(m["name"], m["centered"], tuple(m["scale"]), None if m["shift"] is None else tuple(m["shift"]))
            for m in data["maps"]
        ]
        return cls(
            maps=maps,
            weights=[WeightSpec(**w) for w in data["weights"]],
            biases=[BiasSpec(**b) for b in data["biases"]],
            keys=dict(data["keys"]),
        )
