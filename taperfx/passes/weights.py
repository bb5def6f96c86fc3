"""Folded copies of linear weights (``fold_linear``), and the thread and block budget every fold runs under.

The arithmetic (docs/method.md §8, float64, rounded once) is ``blockfold.LinearFold``'s;
here it writes into a fresh tensor, because the input's weights are shared with the
user's model. Why blocks, and why this shape: a large fold is bound by memory traffic,
not arithmetic, so each weight is read once and its result written once, and all
float64 work happens in one reused scratch block of ``BLOCK_ELEMENTS``.

Parallelism comes from folding several weights at once on Python threads (the
ops release the GIL, and much of the time is the kernel faulting in fresh result
memory), never from torch's intra-op pool: callers fold inside
``one_intra_op_thread()``, because on a busy machine the pool's spinning workers
made a fold many times slower (bench/fold_speed.py).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

from taperfx.passes.blockfold import LinearFold, fold_rows

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
    if weight.dim() != 2:
        raise ValueError(f"a linear weight is 2-D, got shape {tuple(weight.shape)}")
    rows = weight.t() if in_out else weight  # a stored (in, out) weight folds as its (out, in) view: one pass
    fold = LinearFold(scale, shift, centered=centered, in_out=False, shape=tuple(rows.shape), device=weight.device)
    result = torch.empty_like(weight, memory_format=torch.contiguous_format)
    result_rows = result.t() if in_out else result
    fold_rows(
        fold,
        lambda a, b: rows[a:b],
        lambda a, folded: result_rows[a : a + folded.shape[0]].copy_(folded),  # the one rounding to the dtype
        block_elements=BLOCK_ELEMENTS,
    )
    new_bias = fold.new_bias(bias)
    if new_bias is None:
        return result, bias
    return result, new_bias.to(bias.dtype if bias is not None else weight.dtype)
