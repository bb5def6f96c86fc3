"""The local check of every rewrite: the original nodes against the rewritten ones, on random probes.

For each folded norm, the nodes of the *real graph* from the norm's input to each
consumer's output are interpreted in float64 on the host, whatever device the weights
are on (every floating dtype argument of a cast is read as float64, every stored
tensor is upcast), once before the edit and once after, on the same random probe of
the norm's input. The matcher's model of the graph plays no part: whatever the nodes
compute is what is compared.

The only difference an exact fold leaves is the single rounding of each folded
tensor to its stored dtype, so the tolerance is that rounding's worst case,
``eps/2 · Σ|x||W'| + eps/2 · |b'|`` per output, obtained by interpreting the
rewritten nodes a third time on ``|probe|`` and ``|stored tensors|`` (the rewritten
path is linear), plus float64's own accumulation error.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch.fx import Node

from taperfx.passes._compat import size_hint
from taperfx.passes.match import LinearUse, NormMap

__all__ = ["Probe", "capture", "confirm"]

_F64 = torch.float64
_SAMPLED_OUTPUTS = 64  # output features checked per consumer (all of them when it has no more)


class Unevaluable(Exception):
    """The consumer's value depends on something other than the norm's input and stored tensors."""


@dataclass
class Probe:
    """A norm's random input and the float64 values its consumers computed on it before the edit."""

    norm: NormMap
    uses: list[LinearUse]
    probe: torch.Tensor | None
    expected: list[torch.Tensor] | None
    problem: str | None = None  # why the original could not be interpreted


def _probe_for(node: Node, generator: torch.Generator) -> torch.Tensor:
    """Random float64 values laid out with the traced strides of ``node`` (a slice, a transpose, an
    ``expand`` whose rows share memory): a rewrite whose ops depend on strides (a ``view`` of a slice)
    fails here, not in the folded program."""
    val = node.meta.get("val")
    shape = [size_hint(s) for s in val.shape]
    stride = [size_hint(s) for s in val.stride()]
    extent = 0 if 0 in shape else 1 + sum((n - 1) * step for n, step in zip(shape, stride))
    # Uniform in [-1, 1): any generic values serve an exactness check, and these cost a quarter of normal ones.
    values = torch.rand(extent, generator=generator, dtype=_F64).mul_(2).sub_(1)
    return values.as_strided(shape, stride)


def capture(store, norm: NormMap, uses: list[LinearUse], seed: int = 0) -> Probe:
    """Interpret the original nodes from ``norm.source`` to every consumer on a random probe (before the edit)."""
    probe = _probe_for(norm.source, torch.Generator().manual_seed(seed))
    sampled = _sampled_rows(store, [(u, u.weight, u.bias) for u in uses])
    try:
        expected = _evaluate(store, norm.source, probe, [u.matmul for u in uses], sampled, absolute=False)
    except (Unevaluable, RuntimeError) as error:
        return Probe(norm, uses, None, None, str(error))
    return Probe(norm, uses, probe, expected)


def confirm(store, probe: Probe, edited: list) -> str | None:
    """None when the rewritten consumers (``EditedUse`` s, in the order of ``probe.uses``) compute what the
    originals did on the probe; else what differs."""
    if probe.problem is not None:
        return f"the original nodes could not be interpreted: {probe.problem}"
    outputs = [e.output for e in edited]
    sampled = _sampled_rows(store, [(u, e.weight, e.bias) for u, e in zip(probe.uses, edited)])
    read: dict = {}  # each stored tensor's float64 sample, read once for both evaluations
    try:
        got = _evaluate(store, probe.norm.source, probe.probe, outputs, sampled, absolute=False, read=read)
        bound = _evaluate(store, probe.norm.source, probe.probe.abs(), outputs, sampled, absolute=True, read=read)
    except (Unevaluable, RuntimeError) as error:
        return f"the rewritten nodes could not be interpreted: {error}"
    stored = _stored_inputs(store, probe.norm.source, outputs)
    eps = max((torch.finfo(store.tensor(n).dtype).eps for n in stored), default=0.0)
    d = probe.probe.shape[-1]
    for use, want, have, size in zip(probe.uses, probe.expected, got, bound):
        if want.shape != have.shape:
            return f"{use.matmul.name}: shape {tuple(have.shape)} after the edit, {tuple(want.shape)} before"
        tolerance = (eps + 16 * d * torch.finfo(_F64).eps) * size + torch.finfo(_F64).tiny
        excess = ((have - want).abs() - tolerance).max().item() if want.numel() else 0.0
        if not excess <= 0:
            worst = (have - want).abs().max().item()
            return f"{use.matmul.name}: differs by up to {worst:.3g} beyond the rounding of the folded tensors"
    return None


def _stored_inputs(store, source: Node, outputs: list[Node]) -> list[Node]:
    """The stored tensors the ``outputs`` read between ``source`` and themselves (not the graph above it)."""
    seen, stack, found = {source}, list(outputs), []
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if store.tensor(node) is not None:
            found.append(node)
        elif node.op == "call_function":
            stack += node.all_input_nodes
    return found


def _sampled_rows(store, uses) -> dict[Node, tuple[int, torch.Tensor]]:
    """``{stored node: (axis, output rows)}`` restricting each consumer's weight and bias to a sample of its
    output features, the same sample for every tensor with that many outputs.

    Output features of a linear are independent, so a sample of them checks the rewrite (which
    nodes, which layout, which bias) at a fraction of the cost: GPT-2-XL's fold would otherwise read
    every weight three more times in float64. The rows outside the sample went through the same
    arithmetic (``blockfold.LinearFold``, property-tested row by row), and the global check
    (``verify=True``) runs every output. The sample is drawn on the layout the matcher found; were
    that layout wrong, the restricted tensor no longer fits the consumer and the check fails, never
    passes.
    """
    sampled = {}
    for use, weight, bias in uses:
        tensor = store.tensor(weight)
        axis = 1 if use.in_out else 0
        out = tensor.shape[axis]
        if out <= _SAMPLED_OUTPUTS:
            continue
        rows = _sample(out)
        sampled[weight] = (axis, rows)
        if bias is not None:
            sampled[bias] = (0, rows)
    return sampled


@functools.cache
def _sample(out: int) -> torch.Tensor:
    """The sorted sample of ``_SAMPLED_OUTPUTS`` of ``out`` output rows (drawn once per size; never written)."""
    return torch.randperm(out, generator=torch.Generator().manual_seed(out))[:_SAMPLED_OUTPUTS].sort().values


def _evaluate(
    store,
    source: Node,
    probe: torch.Tensor,
    outputs: list[Node],
    sampled: dict,
    *,
    absolute: bool,
    read: dict | None = None,
) -> list[torch.Tensor]:
    """Float64 values of ``outputs`` with ``source`` set to ``probe``, computed from the real nodes.

    ``read`` (``{node: float64 sample}``), when given, keeps the stored tensors' samples for another
    evaluation of the same nodes."""
    memo: dict[Node, object] = {source: probe}
    read = {} if read is None else read

    def value(node: Node):
        if node in memo:
            return memo[node]
        stored = store.tensor(node)
        if stored is not None:
            if node not in read:
                read[node] = _host_sample(stored.detach(), sampled.get(node))
            result = read[node].abs() if absolute else read[node]
        elif isinstance(node.meta.get("val"), (int, torch.SymInt)):
            result = size_hint(node.meta["val"])  # a size computed from some input: its example value
        elif node.op == "call_function":
            args = torch.fx.node.map_aggregate(node.args, lambda a: value(a) if isinstance(a, Node) else _f64(a))
            kwargs = torch.fx.node.map_aggregate(node.kwargs, lambda a: value(a) if isinstance(a, Node) else _f64(a))
            result = node.target(*args, **kwargs)
        else:
            raise Unevaluable(f"{node.name} ({node.op}) is neither the norm's input nor a stored tensor")
        memo[node] = result
        return result

    with torch.no_grad():
        return [value(node) for node in outputs]


def _host_sample(tensor: torch.Tensor, sample: tuple[int, torch.Tensor] | None) -> torch.Tensor:
    """``tensor`` (restricted to its sampled rows) in float64 on the host, where every check runs: the probe
    is made there, an accelerator's float64 may be slow or missing, and only the samples travel."""
    if sample is not None:
        axis, rows = sample
        tensor = tensor.index_select(axis, rows.to(tensor.device))
    return tensor.to("cpu", _F64)


def _f64(arg):
    """Floating dtype arguments (casts) read as float64, so the interpretation is exact arithmetic."""
    return _F64 if isinstance(arg, torch.dtype) and arg.is_floating_point else arg
