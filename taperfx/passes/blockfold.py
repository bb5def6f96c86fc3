"""The fold of one weight (docs/method.md §8) applied block by block of its stored rows, wherever the rows live.

``fold_linear`` (weights.py) returns a new tensor; a fold that must not allocate
(in place in memory) or cannot hold the weight at all (streamed from a shard on
disk) needs the same arithmetic over blocks of rows read from somewhere and
written somewhere else. ``LinearFold`` is that arithmetic, in float64:

    (out, in) rows:   W'[o, :] = W[o, :] ⊙ s − mean_i(W[o, i] s_i)     b'[o] += W[o, :] · β
    (in, out) rows:   W'[i, :] = W[i, :] s_i − mean_j(W[j, :] s_j)     b' += W[i, :] β_i  (summed)

(``s``: the map's scale, ``β``: its shift; the mean term only for a centered
map, LayerNorm's.) Each row's mean is a dot product with ``s / d`` and the
scaled row minus it is one ``addcmul``: each float64 block then goes through
the cache twice where a ``mul``, a ``mean`` and a ``sub`` took it four times,
which is most of an in-place fold's time (bench/fold_speed.py).

A stored (out, in) row folds on its own; for a weight stored (in, out) (``x @ W``,
GPT-2's Conv1D) the centering needs column means over all rows, so that case
makes a first pass (``observe``) before any row is written. The bias correction
is always computed from the original rows (observed before they are folded).
"""

from __future__ import annotations

from typing import Callable

import torch

__all__ = ["LinearFold", "fold_rows", "fold_in_place", "rows_per_block"]

_F64 = torch.float64


def rows_per_block(row_length: int, block_elements: int) -> int:
    """Rows of ``row_length`` that fit a float64 block of ``block_elements``."""
    return max(1, block_elements // max(1, row_length))


class LinearFold:
    """Fold of one stored weight of shape ``shape`` by the map ``(scale, shift, centered)``."""

    def __init__(
        self,
        scale: torch.Tensor,
        shift: torch.Tensor | None,
        *,
        centered: bool,
        in_out: bool,
        shape: tuple[int, ...],
        device: torch.device | str | None = None,
    ) -> None:
        """``device``: where the rows are folded (the weight's; default the scale's). Every float64 tensor of
        the fold lives there, so a fold on an accelerator never round-trips through the host."""
        if len(shape) != 2:
            raise ValueError(f"a linear weight is 2-D, got shape {tuple(shape)}")
        features, outputs = (shape[0], shape[1]) if in_out else (shape[1], shape[0])
        if features != scale.numel():
            raise ValueError(f"weight of shape {tuple(shape)} does not take {scale.numel()} input features")
        self.device = torch.device(device) if device is not None else scale.device
        f64 = {"device": self.device, "dtype": _F64}
        self.scale = scale.reshape(-1).to(**f64)
        self.shift = None if shift is None else shift.reshape(-1).to(**f64)
        self.centered, self.in_out, self.shape = centered, in_out, tuple(shape)
        self.bias_delta = None if shift is None else torch.zeros(outputs, **f64)
        self._column_sum = torch.zeros(outputs, **f64) if in_out and centered else None
        self._minus_mean_weights = -self.scale / features if centered and not in_out else None

    @property
    def needs_first_pass(self) -> bool:
        """True when every row must be observed before the first is folded (centering over stored rows)."""
        return self._column_sum is not None

    def observe(self, rows: torch.Tensor, start: int) -> None:
        """Accumulate what needs the original rows ``[start, start + len(rows))`` (float64)."""
        stop = start + rows.shape[0]
        if self.in_out:
            if self.shift is not None:
                self.bias_delta.addmv_(rows.t(), self.shift[start:stop])
            if self._column_sum is not None:
                self._column_sum.addmv_(rows.t(), self.scale[start:stop])
        elif self.shift is not None:
            self.bias_delta[start:stop].addmv_(rows, self.shift)

    def fold(self, rows: torch.Tensor, start: int) -> torch.Tensor:
        """Fold float64 rows ``[start, ...)`` in place (after they were observed) and return them."""
        if self.in_out:
            scale = self.scale[start : start + rows.shape[0], None]
            if self._column_sum is None:
                return rows.mul_(scale)
            return torch.addcmul(self._column_sum / -self.shape[0], rows, scale, out=rows)
        if self._minus_mean_weights is None:
            return rows.mul_(self.scale)
        minus_mean = torch.mv(rows, self._minus_mean_weights).unsqueeze_(1)
        return torch.addcmul(minus_mean, rows, self.scale, out=rows)

    def new_bias(self, bias: torch.Tensor | None) -> torch.Tensor | None:
        """``b + W β`` in float64 after every row was observed; None when the map has no shift."""
        if self.bias_delta is None:
            return None
        return self.bias_delta if bias is None else bias.reshape(-1).to(self.device, _F64) + self.bias_delta


def fold_rows(
    fold: LinearFold,
    read: Callable[[int, int], torch.Tensor],
    write: Callable[[int, torch.Tensor], None] | None,
    *,
    block_elements: int,
) -> None:
    """Run ``fold`` over the stored rows: ``read(start, stop)`` gives them, ``write(start, folded)`` takes
    the float64 result of each block in order. ``write=None`` only observes (the bias correction)."""
    n_rows, row_length = fold.shape
    step = rows_per_block(row_length, block_elements)
    scratch = torch.empty(min(step, n_rows), row_length, dtype=_F64, device=fold.device)
    spans = [(a, min(a + step, n_rows)) for a in range(0, n_rows, step)]
    first_pass = fold.needs_first_pass or write is None
    if first_pass:
        for a, b in spans:
            fold.observe(scratch[: b - a].copy_(read(a, b)), a)
    if write is None:
        return
    for a, b in spans:
        work = scratch[: b - a].copy_(read(a, b))
        if not first_pass:
            fold.observe(work, a)
        write(a, fold.fold(work, a))


@torch.no_grad()
def fold_in_place(
    weight: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor | None,
    *,
    centered: bool,
    in_out: bool,
    block_elements: int = 65536,
) -> LinearFold:
    """Write the folded weight into ``weight`` itself (no allocation of its size).

    Returns the fold, whose ``new_bias(b)`` gives ``b + W β`` (float64, from the
    original rows) for any bias the layer reads, or None when the map has no shift.
    ``weight`` must be contiguous: its rows are read and written through views.
    """
    if not weight.is_contiguous():
        raise ValueError("fold_in_place needs a contiguous weight (it rewrites the tensor's own storage)")
    fold = LinearFold(scale, shift, centered=centered, in_out=in_out, shape=tuple(weight.shape), device=weight.device)
    fold_rows(
        fold,
        lambda a, b: weight[a:b],
        lambda a, rows: weight[a : a + rows.shape[0]].copy_(rows),
        block_elements=block_elements,
    )
    return fold
