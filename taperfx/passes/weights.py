"""The folding arithmetic of SPEC §8, in float64, a block of output rows at a time.

For a linear ``z = y Wᵀ + b`` fed by a gate-zero map with per-feature scale ``s``:

    RMS:  y = x ⊙ s               W' = W · diag(s)                       b' = b
    LN:   y = (x − mean x) ⊙ s + β   W' = W · diag(s) · (I − 11ᵀ/d)         b' = b + W β

``W'[o, i] = W[o, i]·s_i − mean_j W[o, j]·s_j`` for LN. Every block is computed in
float64 from the original weight and cast once into a preallocated result of the
weight's dtype, so the transient memory is one float64 block, not a copy of W.
"""

from __future__ import annotations

import torch

__all__ = ["fold_linear"]

_BLOCK_ELEMENTS = 1 << 20  # float64 working set per block: 8 MiB


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
    s = scale.to(device=weight.device, dtype=torch.float64)
    beta = None if shift is None else shift.to(device=weight.device, dtype=torch.float64)
    result = torch.empty_like(weight)
    result_rows = result.t() if in_out else result
    new_bias = None
    if beta is not None:
        new_bias = torch.zeros(rows.shape[0], dtype=torch.float64, device=weight.device)
        if bias is not None:
            new_bias += bias.to(torch.float64)
    step = max(1, _BLOCK_ELEMENTS // max(1, rows.shape[1]))
    for start in range(0, rows.shape[0], step):
        block = rows[start : start + step].to(torch.float64)
        if beta is not None:
            new_bias[start : start + step] += block @ beta
        block.mul_(s)
        if centered:
            block.sub_(block.mean(dim=1, keepdim=True))
        result_rows[start : start + step].copy_(block)
    if new_bias is None:
        return result, bias
    dtype = bias.dtype if bias is not None else weight.dtype
    return result, new_bias.to(dtype)
