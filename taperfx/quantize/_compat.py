"""The private torch ops the CPU kernels rely on, in one place, so a torch upgrade breaks here only.

ATen's own weight-only kernels for CPU: ``_weight_int4pack_mm_for_cpu`` (4-bit,
group-wise asymmetric, the tinygemm convention ``w = (q - 8)·scale + zero``) and
``_weight_int8pack_mm`` (8-bit, one scale per output row). Both want bfloat16
activations to be fast: with float32 activations they were 3-10x slower than the
float32 linear on this CPU (bench/results/quantize_decode.md).(The fake-mode lookup
for new nodes' ``meta["val"]`` is shared with the fold: ``taperfx._compat``.)
"""

from __future__ import annotations

import torch

__all__ = [
    "INT4_N_MULTIPLE",
    "INT8_K_MULTIPLE",
    "pack_int4_cpu",
    "int4_mm_cpu",
    "int8_mm_cpu",
    "copy_module_hooks",
]

INT4_N_MULTIPLE = 16  # _convert_weight_to_int4pack_for_cpu: "expect N to be dividable by 16"
# _weight_int8pack_mm crashes the process (segmentation fault, torch 2.13 CPU) for more than one row of
# activations when K is not a multiple of 8; found by tests/test_quantize_kernels.py. Padded, never passed.
INT8_K_MULTIPLE = 8


def pack_int4_cpu(codes: torch.Tensor) -> torch.Tensor:
    """(N, K) int32 codes in [0, 15] -> the kernel's packed uint8 (N, K/2)."""
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)


def int4_mm_cpu(x: torch.Tensor, packed: torch.Tensor, group_size: int, scales_zeros: torch.Tensor) -> torch.Tensor:
    """x (M, K) bfloat16 @ dequantized(packed).T -> (M, N) bfloat16; scales_zeros (K/group, N, 2) bfloat16."""
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group_size, scales_zeros)


def int8_mm_cpu(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x (M, K) @ (weight (N, K) int8 · scales (N,)).T -> (M, N), in x's dtype."""
    return torch.ops.aten._weight_int8pack_mm(x, weight, scales)


def copy_module_hooks(old: torch.nn.Module, new: torch.nn.Module) -> None:
    """Give ``new`` the forward (pre-)hooks ``old`` carries (e.g. ``fold_module``'s call-path guard), so that a
    module swapped in at the same path is observed as the one it replaces."""
    for hook in old._forward_pre_hooks.values():
        new.register_forward_pre_hook(hook)
    for hook in old._forward_hooks.values():
        new.register_forward_hook(hook)
