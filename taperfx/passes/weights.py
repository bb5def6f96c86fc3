"""The folding arithmetic of docs/method.md §8, in float64, one cache-sized block of output rows at a time.

For a linear ``z = y Wᵀ + b`` fed by a gate-zero map with per-feature scale ``s``:

    RMS:  y = x ⊙ s               W' = W · diag(s)                       b' = b
    LN:   y = (x − mean x) ⊙ s + β   W' = W · diag(s) · (I − 11ᵀ/d)         b' = b + W β

``W'[o, i] = W[o, i]·s_i − mean_j W[o, j]·s_j`` for LN. Every value is computed in
float64 from the original weight and rounded once, when it is copied into the result.

Why blocks, and why this shape: a large fold is bound by memory traffic, not
arithmetic. The result must be fresh memory (the input's weights are shared with
the user's model), so each weight is read once and its result written once; all
float64 work happens in one reused scratch block that stays in the L2 cache, so
the only memory the fold holds beyond its results is that block (512 KiB).

Parallelism comes from folding several weights at once on Python threads (the
ops release the GIL, and much of the time is the kernel faulting in fresh result
memory), never from torch's intra-op pool: callers fold inside
``one_intra_op_thread()``, because on a busy machine the pool's spinning workers
made a fold many times slower (bench/fold_speed.py).
"""

from __future__ import annotations

import itertools
from contextlib import contextmanager
from typing import Iterator

import torch

__all__ = ["BLOCK_ELEMENTS", "fold_linear", "one_intra_op_thread"]

# 2 MiB of float64 per scratch block. Smaller blocks (512 KiB) fit L2 but double the fold's time on 2 threads:
# each block costs a handful of torch calls under the GIL (bench: 0.58 s vs 0.31 s for 2 GB of weights).
BLOCK_ELEMENTS = 1 << 18


@contextmanager
def one_intra_op_thread() -> Iterator[int]:
    """Run torch ops single-threaded inside; yields the thread budget that was set before."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield threads
    finally:
        torch.set_num_threads(threads)


@torch.no_grad()  # new constants, not a step of training: the fold is not differentiated through
def fold_linear(
    weight: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor | None,
    bias: torch.Tensor | None,
    *,
    centered: bool,
    in_out: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """New ``(weight, bias)`` of a linear whose input map (``scale``, ``shift``, ``centered``) is folded in.

    ``weight`` is (out, in) as in ``nn.Linear``, or (in, out) with ``in_out=True``
    (``x @ W``, Hugging Face's Conv1D). The inputs are left untouched; without a
    shift the bias is returned as given (possibly None), since nothing changes it.
    """
    rows = weight.t() if in_out else weight
    if rows.dim() != 2 or rows.shape[1] != scale.numel():
        raise ValueError(f"weight of shape {tuple(weight.shape)} does not take {scale.numel()} input features")
    f64 = {"device": weight.device, "dtype": torch.float64}
    s = scale.to(**f64)
    beta = None if shift is None else shift.to(**f64)
    result = torch.empty_like(weight, memory_format=torch.contiguous_format)
    result_rows = result.t() if in_out else result
    new_bias = None
    if beta is not None:
        new_bias = torch.zeros(rows.shape[0], **f64) if bias is None else bias.to(**f64, copy=True)
    step = max(1, BLOCK_ELEMENTS // rows.shape[1])
    scratch = torch.empty(min(step, rows.shape[0]), rows.shape[1], **f64)
    bias_blocks = new_bias.split(step) if new_bias is not None else itertools.repeat(None)
    for block, out, bias_block in zip(rows.split(step), result_rows.split(step), bias_blocks):
        work = scratch[: block.shape[0]].copy_(block)
        if bias_block is not None:
            bias_block.addmv_(work, beta)
        work.mul_(s)
        if centered:
            work.sub_(work.mean(dim=1, keepdim=True))
        out.copy_(work)  # the one rounding to the weight's dtype
    if new_bias is None:
        return result, bias
    dtype = bias.dtype if bias is not None else weight.dtype
    return result, new_bias.to(dtype)
