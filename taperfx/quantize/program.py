"""Quantize an ExportedProgram (the folded ``.pt2`` path): rewrite its ``aten.linear`` / ``aten.embedding``
nodes into ``taperfx::`` operator calls over new quantized constants.

The input program is never modified (the rewrite works on a ``ProgramStore`` copy).
A tied output head reads the embedding's placeholder; it gets its own quantized
constants, and the float table stays only if the gather still reads it. The
result saves and loads with ``torch.export.save`` / ``load`` (after ``import
taperfx.quantize``, which registers the operators) and runs through ``.module()``
and ``torch.compile``. CPU only: a program whose weights live on CUDA is refused
(quantize the module instead; CUDA goes through torchao).
"""

from __future__ import annotations

import torch
from torch.export import ExportedProgram
from torch.fx import Node

from taperfx._compat import fake_mode_of
from taperfx.passes.stores import ProgramStore
from taperfx.quantize.config import QuantizeConfig
from taperfx.quantize.errors import NotQuantized, UnsupportedDevice
from taperfx.quantize.handlers import Kernel, handler_for
from taperfx.quantize.report import QuantizeReport

__all__ = ["quantize_program"]

_LINEAR = torch.ops.aten.linear.default
_EMBEDDING = torch.ops.aten.embedding.default


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _owner(node: Node, weight_target: str) -> str:
    """The module path that called ``node`` (``output`` for a tied head, not the embedding it shares a weight with)."""
    stack = node.meta.get("nn_module_stack")
    if stack:
        path, _ = list(stack.values())[-1]
        if path:
            return path
    return weight_target.rpartition(".")[0] or weight_target.replace(".", "_")


def _replace(store: ProgramStore, node: Node, weight_node: Node, kernel: Kernel, before: tuple, after: tuple) -> None:
    """Turn ``node`` into ``kernel.op(*before, *quantized tensors, *after)``, keeping its name (outputs refer to it)."""
    owner = _owner(node, store.target(weight_node))
    tensors = [store.add(f"{owner}.{name}", tensor, like=weight_node) for name, tensor in kernel.tensors]
    node.target, node.args, node.kwargs = kernel.op, (*before, *tensors, *after), {}
    with fake_mode_of(store.graph):
        node.meta["val"] = kernel.op(*(a.meta["val"] if isinstance(a, Node) else a for a in node.args))


def _linear_args(node: Node, kernel: Kernel) -> tuple[tuple, tuple]:
    """``linear(x, w, bias=None)`` -> ``op(x, *tensors, bias, *scalars)``."""
    x, _, *rest = node.args
    return (x,), (rest[0] if rest else None, *kernel.scalars)


def _embedding_args(node: Node, kernel: Kernel) -> tuple[tuple, tuple]:
    """``embedding(w, ids, ...)`` -> ``op(*tensors, ids, *scalars)``."""
    return (), (node.args[1], *kernel.scalars)


@torch.no_grad()
def quantize_program(program: ExportedProgram, config: QuantizeConfig) -> tuple[ExportedProgram, QuantizeReport]:
    """A quantized copy of ``program`` and the report; see the module docstring."""
    handler = handler_for(config)
    store = ProgramStore(program)
    report = QuantizeReport(config.name)
    graph = store.graph
    embeddings = [n for n in graph.nodes if n.target is _EMBEDDING and store.tensor(n.args[0]) is not None]
    table = max(embeddings, key=lambda n: store.tensor(n.args[0]).shape[0], default=None)
    vocab = store.tensor(table.args[0]).shape[0] if table is not None else None
    for node in [n for n in graph.nodes if n.target is _LINEAR]:
        weight = store.tensor(node.args[1])
        name = store.target(node.args[1]) if weight is not None else node.name
        if weight is None or weight.dim() != 2:
            report.kept.append((node.name, "weight is not a stored 2-D tensor"))
            continue
        if weight.device.type != "cpu":
            raise UnsupportedDevice(
                f"{name} lives on {weight.device}; ExportedPrograms are quantized for CPU kernels only "
                "(on CUDA, quantize the module: torchao's GPU kernels)"
            )
        if not config.head and weight.shape[0] == vocab:
            report.kept.append((name, "output head (head=False)"))
            continue
        kernel = handler.linear_kernel(weight, config)
        _replace(store, node, node.args[1], kernel, *_linear_args(node, kernel))
        report.quantized.append(name)
        report.float_bytes += _nbytes(weight)
        report.quantized_bytes += kernel.nbytes()
    if not report.quantized:
        raise NotQuantized("the program has no aten.linear with a stored weight to quantize")
    if config.embedding and table is not None:
        weight_node = table.args[0]
        weight, name = store.tensor(weight_node), store.target(weight_node)
        kernel = handler.embedding_kernel(weight, config)
        _replace(store, table, weight_node, kernel, *_embedding_args(table, kernel))
        report.quantized.append(name)
        report.float_bytes += _nbytes(weight)
        report.quantized_bytes += kernel.nbytes()
    store.prune()
    graph.lint()
    return store.result(), report
