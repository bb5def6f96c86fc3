"""Apply a ``FoldPlan`` to a safetensors checkpoint directory, one tensor at a time.

Nothing here holds a whole weight. Each source shard is memory-mapped; a weight
to fold is read in blocks of rows, folded in a float64 scratch block
(``LinearFold``) and written straight to its output shard, whose header is
written first from the shapes alone (``ShardWriter``). Tensors the plan keeps are
copied as bytes. The biases the fold changes (``b + W β``) are small and computed
first, from the original rows, so that no order of writing can read a folded
weight as if it were the original. Peak memory is the plan, the biases, and two
blocks (the mapped source pages belong to the page cache, not to the process).

``stream_fold`` writes a new directory: one output shard per source shard, same
names, with a new ``model.safetensors.index.json``. ``stream_fold_in_place``
rewrites the weights inside the source shards under a crash-safe journal
(``taperfx.passes.journal``). ``spot_check`` reads a few folded layers back from
disk and compares them with a float64 evaluation of the original layer.
"""

from __future__ import annotations

import os
from collections import defaultdict
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from taperfx.passes.blockfold import LinearFold, fold_rows
from taperfx.passes.fold_plan import FoldPlan, WeightSpec
from taperfx.passes.shards import ShardReader, ShardWriter, checkpoint_files, write_index
from taperfx.passes.weights import one_intra_op_thread

__all__ = ["StreamStats", "stream_fold", "new_biases", "fold_weight_into", "spot_check", "SpotCheck"]

BLOCK_ELEMENTS = 1 << 20  # 8 MiB of float64 per block: large enough that Python overhead is noise


@dataclass
class StreamStats:
    """What a streamed fold moved: bytes of weights folded, bytes copied unchanged, bytes written in all."""

    folded_bytes: int = 0
    copied_bytes: int = 0
    written_bytes: int = 0


class Sources:
    """The source shards of a checkpoint directory, opened on first use."""

    def __init__(self, directory: Path, stack: ExitStack, *, writable: bool = False) -> None:
        self.directory, self.stack, self.writable = directory, stack, writable
        self.files = checkpoint_files(directory)
        self._open: dict[str, ShardReader] = {}

    def shard(self, key: str) -> ShardReader:
        if key not in self.files:
            raise KeyError(f"{self.directory}: the checkpoint holds no tensor {key}")
        name = self.files[key]
        if name not in self._open:
            self._open[name] = self.stack.enter_context(ShardReader(self.directory / name, writable=self.writable))
        return self._open[name]

    def view(self, key: str) -> torch.Tensor:
        return self.shard(key).view(key)

    def info(self, key: str):
        return self.shard(key).tensors[key]


def _linear_fold(plan: FoldPlan, spec, shape) -> LinearFold:
    m = plan.maps[spec.map]
    scale, shift = m.tensors()
    return LinearFold(scale, shift, centered=m.centered, in_out=spec.in_out, shape=tuple(shape))


def new_biases(plan: FoldPlan, sources: Sources, *, block_elements: int = BLOCK_ELEMENTS) -> dict[str, torch.Tensor]:
    """``{target key: b + W β}`` of every bias the plan changes or adds, from the original weights, in the
    dtype the output stores (the old bias's, or the weight's for a new bias)."""
    out = {}
    for spec in plan.biases:
        weight = sources.view(spec.weight)
        fold = _linear_fold(plan, spec, weight.shape)
        fold_rows(fold, lambda a, b: weight[a:b], None, block_elements=block_elements)
        old = None if spec.source is None else sources.view(spec.source)
        dtype = weight.dtype if old is None else old.dtype
        out[spec.target] = fold.new_bias(old).to(dtype)
    return out


def fold_weight_into(plan: FoldPlan, spec: WeightSpec, source: torch.Tensor, write, *, block_elements: int) -> None:
    """Fold the weight ``source`` (a view of its shard) by ``spec``'s map; ``write(start, rows)`` takes
    each block of folded rows, already cast to the weight's dtype."""
    fold = _linear_fold(plan, spec, source.shape)
    fold_rows(
        fold, lambda a, b: source[a:b], lambda a, rows: write(a, rows.to(source.dtype)), block_elements=block_elements
    )


def _output_layout(plan: FoldPlan, sources: Sources) -> dict[str, dict[str, str]]:
    """``{shard file: {output key: source key}}``: each output tensor goes to the shard of its source."""
    layout: dict[str, dict[str, str]] = defaultdict(dict)
    for target, source in plan.output_keys().items():
        layout[sources.files[source]][target] = source
    return layout


def stream_fold(
    plan: FoldPlan,
    source: str | os.PathLike,
    out: str | os.PathLike,
    *,
    progress: bool = True,
    block_elements: int = BLOCK_ELEMENTS,
) -> StreamStats:
    """Write the folded checkpoint of ``source`` into the (new, empty) directory ``out``."""
    source, out = Path(source), Path(out)
    stats = StreamStats()
    with ExitStack() as stack:
        stack.enter_context(one_intra_op_thread())
        sources = Sources(source, stack)
        missing = sorted({w.source for w in plan.weights} - set(sources.files))
        missing += sorted(set(plan.keys) - set(sources.files))
        if missing:
            raise ValueError(f"{source}: the fold plan names tensors the checkpoint lacks: {missing[:8]}")
        biases = new_biases(plan, sources, block_elements=block_elements)
        weights = {w.target: w for w in plan.weights}
        weight_map, total = {}, 0
        for shard, tensors in sorted(_output_layout(plan, sources).items()):
            layout = {}
            for target, key in tensors.items():
                if target in biases:
                    layout[target] = (biases[target].dtype, tuple(biases[target].shape))
                else:
                    info = sources.info(key)
                    layout[target] = (info.dtype, info.shape)
            writer = ShardWriter(out / shard, layout)
            nbytes = sum(ShardWriter.nbytes(d, s) for d, s in layout.values())
            bar = tqdm(total=nbytes, desc=shard, unit="B", unit_scale=True, disable=not progress, leave=False)
            try:
                for target, key in tensors.items():
                    if target in biases:
                        writer.write(biases[target])
                        size = biases[target].nbytes
                    elif target in weights:
                        view = sources.view(key)
                        fold_weight_into(
                            plan,
                            weights[target],
                            view,
                            lambda a, rows: writer.write(rows),
                            block_elements=block_elements,
                        )
                        size = view.nbytes
                        stats.folded_bytes += size
                    else:
                        raw = sources.shard(key).raw(key)
                        writer.write_raw(raw)
                        size = len(raw)
                        stats.copied_bytes += size
                    bar.update(size)
            finally:
                bar.close()
                writer.close()
            weight_map.update(dict.fromkeys(tensors, shard))
            total += nbytes
        stats.written_bytes = total
        write_index(out, weight_map, total)
    return stats


@dataclass(frozen=True)
class SpotCheck:
    """One folded weight evaluated on random probes against the original layer in float64."""

    weight: str
    max_error: float  # max |folded − original| over the probes and sampled outputs
    tolerance: float  # what rounding the folded weight and bias once to their dtype can explain
    ok: bool


def spot_check(
    plan: FoldPlan,
    source: str | os.PathLike,
    out: str | os.PathLike,
    *,
    layers: int = 3,
    outputs: int = 8,
    seed: int = 0,
) -> list[SpotCheck]:
    """Evaluate ``layers`` folded weights (first, middle, last of the plan) of ``out`` against ``source``.

    For ``outputs`` sampled output features of each weight and a few random probes
    x (float64): the original ``W (map x) + b`` from the source shards, and the
    folded ``W' x + b'`` from the written ones. The tolerance is the rounding of W'
    and b' to their stored dtype: ``eps · (Σ|W'ᵢ xᵢ| + |b'|)`` (twice, for the
    float64 reference's own sums), so an exact fold passes in every dtype and any
    mis-fold larger than one rounding fails.
    """
    if not plan.weights:
        return []
    picks = sorted({0, len(plan.weights) // 2, len(plan.weights) - 1})[:layers]
    biases = {b.weight: b for b in plan.biases}
    generator = torch.Generator().manual_seed(seed)
    results = []
    with ExitStack() as stack:
        before, after = Sources(Path(source), stack), Sources(Path(out), stack)
        for i in picks:
            spec = plan.weights[i]
            results.append(_check_layer(plan, spec, biases.get(spec.source), before, after, outputs, generator))
    return results


def _rows(view: torch.Tensor, in_out: bool, index: torch.Tensor) -> torch.Tensor:
    """Output features ``index`` of a weight as float64 (n, in) rows, whatever its layout."""
    return (view[:, index].t() if in_out else view[index]).to(torch.float64)


def _check_layer(plan, spec, bias_spec, before, after, outputs, generator) -> SpotCheck:
    m = plan.maps[spec.map]
    scale, shift = m.tensors()
    original = before.view(spec.source)
    folded = after.view(spec.target)
    n_out = original.shape[1] if spec.in_out else original.shape[0]
    index = torch.randperm(n_out, generator=generator)[:outputs]
    w, w_folded = _rows(original, spec.in_out, index), _rows(folded, spec.in_out, index)
    x = torch.randn(4, scale.numel(), generator=generator, dtype=torch.float64)
    mapped = (x - x.mean(dim=1, keepdim=True) if m.centered else x) * scale + (0 if shift is None else shift)
    expected = mapped @ w.t()
    got = x @ w_folded.t()
    bias_error = torch.zeros(len(index), dtype=torch.float64)
    if bias_spec is not None:
        b_new = after.view(bias_spec.target).to(torch.float64)[index]
        b_old = 0 if bias_spec.source is None else before.view(bias_spec.source).to(torch.float64)[index]
        expected, got = expected + b_old, got + b_new
        bias_error = b_new.abs() * torch.finfo(after.view(bias_spec.target).dtype).eps
    eps = torch.finfo(folded.dtype).eps if folded.dtype.is_floating_point else 0.0
    tolerance = 2 * (eps * (x.abs() @ w_folded.abs().t()) + bias_error) + 1e-12
    error = (got - expected).abs()
    return SpotCheck(spec.target, float(error.max()), float(tolerance.max()), bool((error <= tolerance).all()))
