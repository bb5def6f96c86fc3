"""One handler per scheme, looked up by the config's type, in the style of torchao's ``quantize_(model, config)``.

A handler answers two questions for its scheme: which ``taperfx::`` operator and
quantized tensors replace a linear (or embedding) on CPU (``linear_kernel``,
``embedding_kernel``: used for modules and ExportedPrograms alike), and which
torchao config does the same job on CUDA (``torchao_config``: torchao's GPU
kernels, the project's default there). A new scheme is a config dataclass plus a
handler registered with ``register_handler``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from taperfx.quantize import ops
from taperfx.quantize.config import Int4WeightOnly, Int8WeightOnly, QuantizeConfig
from taperfx.quantize.errors import UnknownScheme

__all__ = ["Kernel", "SchemeHandler", "register_handler", "handler_for"]


@dataclass(frozen=True)
class Kernel:
    """A quantized weight as a call: ``fn(x, *tensors, bias, *scalars)`` for a linear, ``fn(*tensors, ids,
    *scalars)`` for an embedding. ``fn`` is the plain function eager modules call; ``op`` the registered
    operator, with the same arguments, that graphs (ExportedPrograms) hold."""

    fn: Callable
    op: Callable
    tensors: tuple[tuple[str, torch.Tensor], ...]
    scalars: tuple[Any, ...] = ()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for _, t in self.tensors)


@dataclass(frozen=True)
class SchemeHandler:
    linear_kernel: Callable[[torch.Tensor, QuantizeConfig], Kernel]
    embedding_kernel: Callable[[torch.Tensor, QuantizeConfig], Kernel]
    torchao_config: Callable[[QuantizeConfig], Any]


_HANDLERS: dict[type, SchemeHandler] = {}


def register_handler(config_type: type, handler: SchemeHandler) -> None:
    _HANDLERS[config_type] = handler


def handler_for(config: QuantizeConfig) -> SchemeHandler:
    handler = _HANDLERS.get(type(config))
    if handler is None:
        raise UnknownScheme(f"no quantization handler for {type(config).__name__}; known: {sorted(_names())}")
    return handler


def _names() -> list[str]:
    return [t.__name__ for t in _HANDLERS]


def _int4_linear(weight: torch.Tensor, config: Int4WeightOnly) -> Kernel:
    packed = ops.pack_int4(weight, config.group_size)
    return Kernel(
        ops.int4_linear,
        torch.ops.taperfx.linear_int4.default,
        (("packed", packed.packed), ("scales_zeros", packed.scales_zeros)),
        (packed.group_size, packed.out_features),
    )


def _int4_embedding(table: torch.Tensor, config: Int4WeightOnly) -> Kernel:
    rows = ops.pack_int4_rows(table, config.group_size)
    return Kernel(
        ops.int4_embedding,
        torch.ops.taperfx.embedding_int4.default,
        (("packed", rows.packed), ("scales", rows.scales), ("minima", rows.minima)),
        (rows.group_size,),
    )


def _int4_torchao(config: Int4WeightOnly):
    from torchao.quantization import Int4WeightOnlyConfig
    from torchao.quantization.quantize_.workflows import Int4PackingFormat

    # tinygemm's CUDA layout; the PLAIN default needs fbgemm-gpu kernels.
    return Int4WeightOnlyConfig(group_size=config.group_size, int4_packing_format=Int4PackingFormat.TILE_PACKED_TO_4D)


def _int8_linear(weight: torch.Tensor, config: Int8WeightOnly) -> Kernel:
    packed = ops.pack_int8(weight)
    return Kernel(
        ops.int8_linear, torch.ops.taperfx.linear_int8.default, (("codes", packed.codes), ("scales", packed.scales))
    )


def _int8_embedding(table: torch.Tensor, config: Int8WeightOnly) -> Kernel:
    rows = ops.pack_int8_rows(table)
    return Kernel(
        ops.int8_embedding, torch.ops.taperfx.embedding_int8.default, (("codes", rows.codes), ("scales", rows.scales))
    )


def _int8_torchao(config: Int8WeightOnly):
    from torchao.quantization import Int8WeightOnlyConfig

    return Int8WeightOnlyConfig()


register_handler(Int4WeightOnly, SchemeHandler(_int4_linear, _int4_embedding, _int4_torchao))
register_handler(Int8WeightOnly, SchemeHandler(_int8_linear, _int8_embedding, _int8_torchao))
