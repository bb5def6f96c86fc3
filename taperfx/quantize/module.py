"""Quantize an ``nn.Module`` (eager, or to hand to ``torch.compile``): swap its linears and, optionally, its
token embedding for quantized ones.

The input module is never modified: the result is a copy. Which linear is the
output head: the one whose output width equals the token table's row count (the
largest ``nn.Embedding``), tied or not. A tied head gets its own quantized copy,
so the embedding's gather stays exact unless ``config.embedding`` asks otherwise.

CPU weights go through the ``taperfx::`` operators (ATen's CPU kernels); CUDA
weights through torchao's ``quantize_`` with the handler's GPU config (the
default on CUDA). Transformers' ``Conv1D`` (GPT-2: ``x @ W + b`` with W stored
(in, out)) is quantized as the linear it is.
"""

from __future__ import annotations

import copy
import sys

import torch
from torch import nn

from taperfx.quantize import _compat
from taperfx.quantize.config import QuantizeConfig
from taperfx.quantize.errors import NotQuantized
from taperfx.quantize.handlers import handler_for
from taperfx.quantize.modules import QuantizedEmbedding, QuantizedLinear
from taperfx.quantize.report import QuantizeReport

__all__ = ["quantize_module"]


def _as_linear(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight (out, in), bias) of a linear layer, or None when ``module`` is not one."""
    if isinstance(module, nn.Linear):
        return module.weight, module.bias
    hf_utils = sys.modules.get("transformers.pytorch_utils")  # only present if the user's model came from there
    if hf_utils is not None and isinstance(module, hf_utils.Conv1D):
        return module.weight.t(), module.bias
    return None


def _token_table(model: nn.Module) -> tuple[str, nn.Embedding] | None:
    tables = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Embedding)]
    return max(tables, key=lambda item: item[1].num_embeddings, default=None)


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` at ``name``, keeping the hooks the old module carried (``fold_module``'s call-path guard)."""
    parent, _, child = name.rpartition(".")
    old = model.get_submodule(name)
    if new is not old:
        _compat.copy_module_hooks(old, new)
    setattr(model.get_submodule(parent), child, new)


def _bytes(t: torch.Tensor) -> int:
    """Bytes a tensor holds; a torchao tensor subclass counts the inner tensors it flattens to."""
    flatten = getattr(type(t), "__tensor_flatten__", None)
    if flatten is None:
        return t.numel() * t.element_size()
    names, _ = t.__tensor_flatten__()
    return sum(_bytes(getattr(t, name)) for name in names)


def _quantize_cuda_linear(module, weight, config, handler) -> nn.Module:
    from torchao.quantization import quantize_

    if not isinstance(module, nn.Linear):
        module = nn.Linear(weight.shape[1], weight.shape[0], bias=module.bias is not None, device=weight.device)
    module.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)  # untied from any embedding
    quantize_(module, handler.torchao_config(config))
    return module


def _read_by_parent(model: nn.Module) -> set[str]:
    """Linears whose parent reads ``.weight`` directly instead of calling them (nn.MultiheadAttention.out_proj)."""
    return {
        f"{name}.out_proj" if name else "out_proj"
        for name, m in model.named_modules()
        if isinstance(m, nn.MultiheadAttention)
    }


@torch.no_grad()
def quantize_module(model: nn.Module, config: QuantizeConfig) -> tuple[nn.Module, QuantizeReport]:
    """A quantized copy of ``model`` and the report. Raises ``NotQuantized`` when no linear was found.

    A guarded model from ``fold_module`` keeps its call-path guard in the copy.

    The copy is for inference: its remaining float parameters are frozen (``requires_grad=False``), as the
    quantized operators have no gradient and ``torch.compile`` would otherwise trace a training graph.
    """
    handler = handler_for(config)
    model = copy.deepcopy(model).requires_grad_(False)
    report = QuantizeReport(config.name)
    table = _token_table(model)
    vocab = table[1].num_embeddings if table else None
    read_directly = _read_by_parent(model)
    for name, module in list(model.named_modules()):
        linear = _as_linear(module)
        if linear is None:
            continue
        weight, bias = linear
        if name in read_directly:
            report.kept.append((name, "its parent nn.MultiheadAttention reads the weight, not the module"))
            continue
        if not config.head and weight.shape[0] == vocab:
            report.kept.append((name, "output head (head=False)"))
            continue
        if weight.is_cuda:
            new = _quantize_cuda_linear(module, weight, config, handler)
            report.quantized_bytes += _bytes(new.weight)
        else:
            kernel = handler.linear_kernel(weight, config)
            new = QuantizedLinear(kernel, bias, weight.shape[1], weight.shape[0])
            report.quantized_bytes += kernel.nbytes()
        report.float_bytes += _bytes(weight)
        report.quantized.append(name)
        _swap(model, name, new)
    if not report.quantized:
        raise NotQuantized(f"{type(model).__name__} has no nn.Linear (or transformers Conv1D) to quantize")
    if config.embedding and table is not None:
        name, embedding = table
        kernel = handler.embedding_kernel(embedding.weight, config)
        _swap(model, name, QuantizedEmbedding(kernel, embedding.num_embeddings, embedding.embedding_dim))
        report.quantized.append(name)
        report.float_bytes += _bytes(embedding.weight)
        report.quantized_bytes += kernel.nbytes()
    return model, report
