"""Synthetic checkpoints and fold plans for the streamed fold's tests (no model needed)."""

from pathlib import Path

import torch

from taperfx.passes.fold_plan import BiasSpec, FoldPlan, MapSpec, WeightSpec
from taperfx.passes.shards import ShardWriter, write_index
from taperfx.passes.weights import fold_linear


def write_shards(directory: Path, shards: list[dict[str, torch.Tensor]]) -> None:
    """Write ``shards`` (one dict of tensors each) as ``model-i-of-n.safetensors`` with an index."""
    weight_map, total = {}, 0
    for i, tensors in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        writer = ShardWriter(directory / name, {k: (t.dtype, tuple(t.shape)) for k, t in tensors.items()})
        for t in tensors.values():
            writer.write(t)
        writer.close()
        weight_map.update(dict.fromkeys(tensors, name))
        total += sum(t.nbytes for t in tensors.values())
    write_index(directory, weight_map, total)


def layer_plan(layers: list[dict], d: int, generator: torch.Generator) -> FoldPlan:
    """A plan with one map per layer: ``{"weight": key, "in_out": bool, "bias": key|None, "centered": bool}``.

    A centered (LN) map has a shift, so it corrects the layer's bias (adding one under ``<key>.new_bias``
    when the layer has none); every other tensor of the checkpoint is kept by the caller's ``keys``.
    """
    plan = FoldPlan()
    for i, layer in enumerate(layers):
        scale = (torch.rand(d, generator=generator, dtype=torch.float64) + 0.5).tolist()
        shift = torch.randn(d, generator=generator, dtype=torch.float64).tolist() if layer["centered"] else None
        plan.maps.append(MapSpec(f"norm{i}", layer["centered"], tuple(scale), None if shift is None else tuple(shift)))
        plan.weights.append(WeightSpec(layer["weight"], layer["weight"], i, layer["in_out"]))
        if shift is not None:
            bias = layer["bias"]
            target = bias if bias is not None else layer["weight"] + ".new_bias"
            plan.biases.append(BiasSpec(bias, target, layer["weight"], i, layer["in_out"]))
    return plan


def folded_in_memory(plan: FoldPlan, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The plan applied with ``fold_linear`` to tensors held in memory: what a streamed fold must write."""
    out = {}
    biases = {b.weight: b for b in plan.biases}
    for spec in plan.weights:
        scale, shift = plan.maps[spec.map].tensors()
        bias_spec = biases.get(spec.source)
        bias = None if bias_spec is None or bias_spec.source is None else tensors[bias_spec.source]
        centered = plan.maps[spec.map].centered
        weight, new_bias = fold_linear(tensors[spec.source], scale, shift, bias, centered=centered, in_out=spec.in_out)
        out[spec.target] = weight
        if bias_spec is not None:
            out[bias_spec.target] = new_bias
    return out
