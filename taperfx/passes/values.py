"""The folded tensors of a plan, computed before any graph edit, once per stored tensor and layout.

Every value comes from the original tensors (nothing is written yet, so a weight
replaced in place is never read back folded). Uses that read the same weight in
the same layout with the same bias share one job, so a tensor is folded once.
The jobs run on a pool of ``torch.get_num_threads()`` Python threads, with
torch's own pool held to one thread meanwhile: each ``fold_linear`` releases the
GIL in its ops, and much of a large fold is the kernel faulting in fresh result
memory, which scales with threads (bench/fold_speed.py).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from taperfx.passes.decide import Plan, value_key
from taperfx.passes.weights import fold_linear, one_intra_op_thread

__all__ = ["folded_values"]


def folded_values(store, plans: list[Plan]) -> dict[tuple, tuple]:
    """``{value_key(norm, use): (weight, bias, original bias)}`` for every use of every plan."""
    jobs = {}
    for norm, uses in plans:
        for use in uses:
            jobs.setdefault(value_key(norm, use), (norm, use))

    def fold(job) -> tuple:
        norm, use = job
        bias = store.tensor(use.bias) if use.bias is not None else None
        value, new_bias = fold_linear(
            store.tensor(use.weight), norm.scale, norm.shift, bias, centered=norm.centered, in_out=use.in_out
        )
        return value, new_bias, bias

    with one_intra_op_thread() as threads, ThreadPoolExecutor(max_workers=threads) as pool:
        return dict(zip(jobs, pool.map(fold, jobs.values())))
