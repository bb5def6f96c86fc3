"""Quantized linear and embedding as registered torch operators, with the packing that feeds them.

They are ``torch.library`` custom ops (namespace ``taperfx``) rather than Python
functions so that one definition serves every path: eager modules call them,
``torch.compile`` keeps them as opaque calls to the ATen kernel, and an
ExportedProgram holds them as graph nodes that survive ``torch.export.save`` /
``load`` (loading needs ``import taperfx.quantize`` first, which registers them).

Shapes the CPU kernel cannot take are padded, not refused: the int4 kernel wants
N a multiple of 16 and K a multiple of the group size (the width-512 model's MLP
is 1368 wide), so the weight is stored padded with zeros, the activation is
padded on the fly and the output is sliced back.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from taperfx.quantize import _compat
from taperfx.quantize.errors import UnsupportedShape

__all__ = [
    "Int4Weight",
    "Int8Weight",
    "Int4Rows",
    "pack_int4",
    "pack_int8",
    "pack_int4_rows",
    "pack_int8_rows",
    "dequantize_int4",
    "dequantize_int8",
    "int4_linear",
    "int8_linear",
    "int4_embedding",
    "int8_embedding",
]

_KERNEL_DTYPE = torch.bfloat16
_INT4_MAX = 15
_INT8_MAX = 127


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _check_matrix(weight: torch.Tensor, what: str) -> None:
    if weight.dim() != 2 or not weight.is_floating_point() or 0 in weight.shape:
        raise UnsupportedShape(f"{what} needs a non-empty 2-D floating-point weight, got {tuple(weight.shape)}")
    if not torch.isfinite(weight).all():
        raise UnsupportedShape(f"{what}: the weight holds NaN or Inf")


def _representable_scale(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``scale`` rounded up to a value ``dtype`` holds exactly (as float32), so codes are chosen for the scale the
    kernel will use and none of them overflows."""
    if dtype == torch.float32:
        return scale
    return (scale * (1 + torch.finfo(dtype).eps)).to(dtype).float()


def _asymmetric_groups(
    weight: torch.Tensor, group_size: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes in [0, 15], scales and minima per group of ``group_size`` columns, such that ``codes·scale + minimum``
    reproduces the weight within half a step; scale and ``minimum + 8·scale`` are exact in ``dtype``."""
    rows, cols = weight.shape
    groups = weight.float().reshape(rows, cols // group_size, group_size)
    low = groups.amin(-1, keepdim=True)
    high = groups.amax(-1, keepdim=True)
    scale = _representable_scale(((high - low) / _INT4_MAX).clamp_min(torch.finfo(torch.float32).tiny), dtype)
    low = (low + 8 * scale).to(dtype).float() - 8 * scale  # the minimum the kernel's zero point stands for
    codes = ((groups - low) / scale).round().clamp(0, _INT4_MAX)
    return codes.reshape(rows, cols), scale.squeeze(-1), low.squeeze(-1)


class Int4Weight:
    """A linear weight (out, in) quantized for ``taperfx::linear_int4``: kernel-packed codes, (scale, zero) pairs."""

    def __init__(self, packed: torch.Tensor, scales_zeros: torch.Tensor, group_size: int, out_features: int) -> None:
        self.packed, self.scales_zeros, self.group_size, self.out_features = (
            packed,
            scales_zeros,
            group_size,
            out_features,
        )


def pack_int4(weight: torch.Tensor, group_size: int) -> Int4Weight:
    """Quantize ``weight`` (out, in) to 4 bits, group-wise along the input axis, padded for the CPU kernel."""
    _check_matrix(weight, "int4 linear")
    n, k = weight.shape
    padded = F.pad(
        weight.detach().float(), (0, _round_up(k, group_size) - k, 0, _round_up(n, _compat.INT4_N_MULTIPLE) - n)
    )
    codes, scale, low = _asymmetric_groups(padded, group_size, _KERNEL_DTYPE)
    zero = low + 8 * scale  # tinygemm convention: w = (q - 8)·scale + zero = q·scale + low
    scales_zeros = torch.stack([scale.t(), zero.t()], dim=-1).to(_KERNEL_DTYPE).contiguous()
    return Int4Weight(_compat.pack_int4_cpu(codes.cpu()), scales_zeros.cpu(), group_size, n)


def dequantize_int4(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """The float weight ``pack_int4`` represents (same rounding, bfloat16 scales), unpadded: the reference."""
    n, k = weight.shape
    padded = F.pad(weight.detach().float(), (0, _round_up(k, group_size) - k))
    codes, scale, low = _asymmetric_groups(padded, group_size, _KERNEL_DTYPE)
    groups = codes.reshape(n, -1, group_size)
    return (groups * scale[..., None] + low[..., None]).reshape(n, -1)[:, :k]


class Int8Weight:
    """A linear weight (out, in) as int8 codes and one scale per output row."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor) -> None:
        self.codes, self.scales = codes, scales


def _symmetric_rows(weight: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes and one scale per row, exact in ``dtype``, reproducing the weight within half a step."""
    w = weight.detach().float()
    scales = _representable_scale((w.abs().amax(-1) / _INT8_MAX).clamp_min(torch.finfo(torch.float32).tiny), dtype)
    return (w / scales[:, None]).round().clamp(-_INT8_MAX, _INT8_MAX).to(torch.int8), scales


def pack_int8(weight: torch.Tensor) -> Int8Weight:
    """Quantize ``weight`` (out, in) to int8, symmetric, one scale per output row; K padded for the CPU kernel."""
    _check_matrix(weight, "int8 linear")
    codes, scales = _symmetric_rows(weight, _KERNEL_DTYPE)
    codes = F.pad(codes, (0, _round_up(codes.shape[1], _compat.INT8_K_MULTIPLE) - codes.shape[1]))
    return Int8Weight(codes.contiguous(), scales.to(_KERNEL_DTYPE))


def dequantize_int8(weight: torch.Tensor) -> torch.Tensor:
    """The float weight ``pack_int8`` represents (bfloat16 scales): the reference."""
    codes, scales = _symmetric_rows(weight, _KERNEL_DTYPE)
    return codes.float() * scales[:, None]


def pack_int8_rows(table: torch.Tensor) -> Int8Weight:
    """Quantize an embedding table to int8, one float32 scale per row."""
    _check_matrix(table, "int8 embedding")
    codes, scales = _symmetric_rows(table, torch.float32)
    return Int8Weight(codes.contiguous(), scales)


class Int4Rows:
    """An embedding table (rows, dim) as 4-bit codes, two per byte, with float32 scales and minima per group."""

    def __init__(self, packed: torch.Tensor, scales: torch.Tensor, minima: torch.Tensor, group_size: int) -> None:
        self.packed, self.scales, self.minima, self.group_size = packed, scales, minima, group_size


def pack_int4_rows(table: torch.Tensor, group_size: int) -> Int4Rows:
    """Quantize an embedding table group-wise along each row (the embedding dimension)."""
    _check_matrix(table, "int4 embedding")
    if table.shape[1] % group_size:
        raise UnsupportedShape(
            f"int4 embedding: dimension {table.shape[1]} is not a multiple of the group size {group_size}"
        )
    codes, scales, minima = _asymmetric_groups(table, group_size, torch.float32)
    codes = codes.to(torch.uint8)
    return Int4Rows((codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous(), scales, minima, group_size)


# ---- the computations, and the operators that wrap them ------------------------------------------------------------
#
# Eager modules (and torch.compile, which traces through them to the ATen kernels) call the plain functions: going
# through a torch.library custom op costs ~0.1 ms of Python dispatch per call on this CPU (bench/results/
# quantize_decode.md), as much as a 512x512 matmul. ExportedPrograms hold the registered operators, which run the same
# functions.


def _linear_out_shape(x: torch.Tensor, out_features: int) -> list[int]:
    return [*x.shape[:-1], out_features]


def int4_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales_zeros: torch.Tensor,
    bias: torch.Tensor | None,
    group_size: int,
    out_features: int,
) -> torch.Tensor:
    """``F.linear`` with a ``pack_int4`` weight; activations cast to bfloat16 for the kernel, output in x's dtype."""
    padded_k = scales_zeros.shape[0] * group_size
    flat = x.reshape(-1, x.shape[-1]).to(_KERNEL_DTYPE)
    flat = F.pad(flat, (0, padded_k - flat.shape[-1])) if padded_k != flat.shape[-1] else flat
    out = _compat.int4_mm_cpu(flat.contiguous(), packed, group_size, scales_zeros)
    out = (out if out.shape[1] == out_features else out[:, :out_features]).to(x.dtype)
    out = out if bias is None else out + bias
    return out.reshape(_linear_out_shape(x, out_features))


def int8_linear(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear`` with a ``pack_int8`` weight; activations cast to bfloat16 for the kernel, output in x's dtype."""
    flat = x.reshape(-1, x.shape[-1]).to(_KERNEL_DTYPE)
    flat = F.pad(flat, (0, codes.shape[1] - flat.shape[-1])) if codes.shape[1] != flat.shape[-1] else flat
    out = _compat.int8_mm_cpu(flat.contiguous(), codes, scales).to(x.dtype)
    out = out if bias is None else out + bias
    return out.reshape(_linear_out_shape(x, codes.shape[0]))


def int8_embedding(codes: torch.Tensor, scales: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Gather rows of an int8 table and dequantize only those (float32 out)."""
    return F.embedding(ids, codes).float() * F.embedding(ids, scales[:, None])


def int4_embedding(
    packed: torch.Tensor, scales: torch.Tensor, minima: torch.Tensor, ids: torch.Tensor, group_size: int
) -> torch.Tensor:
    """Gather rows of a packed int4 table and dequantize only those (float32 out)."""
    rows = F.embedding(ids, packed)
    codes = torch.stack([rows & 0xF, rows >> 4], dim=-1).flatten(-2).float()
    groups = codes.unflatten(-1, (-1, group_size))
    out = groups * F.embedding(ids, scales)[..., None] + F.embedding(ids, minima)[..., None]
    return out.flatten(-2)


linear_int4 = torch.library.custom_op("taperfx::linear_int4", int4_linear, mutates_args=())
linear_int8 = torch.library.custom_op("taperfx::linear_int8", int8_linear, mutates_args=())
embedding_int8 = torch.library.custom_op("taperfx::embedding_int8", int8_embedding, mutates_args=())
embedding_int4 = torch.library.custom_op("taperfx::embedding_int4", int4_embedding, mutates_args=())


@linear_int4.register_fake
def _(x, packed, scales_zeros, bias, group_size, out_features):
    return x.new_empty(_linear_out_shape(x, out_features))


@linear_int8.register_fake
def _(x, codes, scales, bias):
    return x.new_empty(_linear_out_shape(x, codes.shape[0]))


@embedding_int8.register_fake
def _(codes, scales, ids):
    return scales.new_empty([*ids.shape, codes.shape[1]])


@embedding_int4.register_fake
def _(packed, scales, minima, ids, group_size):
    return scales.new_empty([*ids.shape, 2 * packed.shape[1]])
