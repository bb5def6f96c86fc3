"""The folded values of a plan written into the weights themselves: ``fold(program, inplace=True)``.

The default fold returns fresh tensors because the input program's weights are
shared with the user's model; allocating them is the floor of its time (faulting
in GBs of new pages). A caller that gives the input program up can have the fold
write each private weight where it lies instead: the same float64 block arithmetic
(``fold_in_place``), no allocation of the weight's size. What stays allocated:
new biases (``b + W β``, one vector per layer) and a folded copy of a weight other
layers also read (``untie_shared``), or whose storage another of the program's
tensors lies in, which cannot be rewritten under them.

Same contract as ``values.folded_values``: ``{value_key(norm, use): (weight, bias,
original bias)}``, computed before any graph edit; a weight read by several uses
(the same layout; ``decide`` refuses two layouts) is rewritten once, and each of
its biases corrected from the original rows of that one pass.
"""

from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import torch

from taperfx.passes.blockfold import fold_in_place
from taperfx.passes.decide import Plan, is_private, value_key
from taperfx.passes.weights import BLOCK_ELEMENTS, fold_linear, one_intra_op_thread

__all__ = ["folded_values_in_place"]


def _shared_storages(store) -> set[tuple]:
    """The storages that more than one of the program's tensors lies in (a buffer registered as
    ``linear.weight.detach()``, a slice of another parameter): writing one writes the others."""
    counts = Counter(_storage(t) for t in store.tensors())
    return {key for key, n in counts.items() if n > 1 and key is not None}


def _storage(tensor: torch.Tensor) -> tuple | None:
    """Where a tensor's storage lies; None for a storage without memory (meta, empty), which no write reaches."""
    storage = tensor.untyped_storage()
    return (tensor.device, storage.data_ptr()) if storage.data_ptr() else None


def _rewritable(store, use, uses, shared: set[tuple]) -> bool:
    """A weight only this norm's layers read, stored contiguously in a storage no other tensor of the
    program lies in, whose bias (if any) no layer with another weight reads: rewriting it cannot change
    anything but these layers, and no bias conflict (``decide.bias_conflicts``, found after the values)
    can then undo a rewrite already made."""
    weight = store.tensor(use.weight)
    if not is_private(use.weight, uses) or not weight.is_contiguous() or _storage(weight) in shared:
        return False
    return use.bias is None or all(other.weight is use.weight for other in uses if other.bias is use.bias)


def folded_values_in_place(store, plans: list[Plan]) -> dict[tuple, tuple]:
    """Rewrite every private weight of ``plans`` in place; fresh values only for shared weights."""
    groups: dict = {}  # weight node -> (norm, in_out, uses): one pass per stored weight
    copies = {}
    shared = _shared_storages(store)
    for norm, uses in plans:
        for use in uses:
            if _rewritable(store, use, uses, shared):
                groups.setdefault(use.weight, (norm, use.in_out, []))[2].append(use)
            else:
                copies.setdefault(value_key(norm, use), (norm, use))

    def rewrite(item) -> dict:
        weight_node, (norm, in_out, uses) = item
        weight = store.tensor(weight_node)
        fold = fold_in_place(
            weight, norm.scale, norm.shift, centered=norm.centered, in_out=in_out, block_elements=BLOCK_ELEMENTS
        )
        out = {}
        for use in uses:
            bias = store.tensor(use.bias) if use.bias is not None else None
            new_bias = fold.new_bias(bias)
            if new_bias is None:
                out[value_key(norm, use)] = (weight, bias, bias)
            else:
                out[value_key(norm, use)] = (
                    weight,
                    new_bias.to(bias.dtype if bias is not None else weight.dtype),
                    bias,
                )
        return out

    def copy(item) -> dict:
        key, (norm, use) = item
        bias = store.tensor(use.bias) if use.bias is not None else None
        weight = store.tensor(use.weight)
        value, new_bias = fold_linear(weight, norm.scale, norm.shift, bias, centered=norm.centered, in_out=use.in_out)
        return {key: (value, new_bias, bias)}

    values: dict[tuple, tuple] = {}
    # Copies first: a shared weight is never rewritten in place, but read them before anything else moves.
    with one_intra_op_thread() as threads, ThreadPoolExecutor(max_workers=threads) as pool:
        for part in pool.map(copy, copies.items()):
            values.update(part)
        for part in pool.map(rewrite, groups.items()):
            values.update(part)
    return values
