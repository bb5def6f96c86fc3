"""How close a quantized model's logits stay to the unquantized folded model's: numbers a user can read."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

__all__ = ["Agreement", "agreement"]


@dataclass(frozen=True)
class Agreement:
    """Logit agreement over a batch of token positions.

    ``max_abs_error``/``rms_error`` are relative to the reference logits' RMS (so they
    read as a fraction of the logit scale); ``top1`` is the fraction of positions whose
    arg-max token is unchanged; ``kl`` is the mean KL(reference || quantized) in nats.
    """

    positions: int
    max_abs_error: float
    rms_error: float
    top1: float
    kl: float

    def __str__(self) -> str:
        return (
            f"agreement with the unquantized model over {self.positions} positions: top-1 {self.top1:.2%}, "
            f"logit error rms {self.rms_error:.2e} / max {self.max_abs_error:.2e} of the logit rms, "
            f"KL {self.kl:.2e} nats"
        )


def _logits(step: Callable, ids: torch.Tensor) -> torch.Tensor:
    out = step(ids, torch.arange(ids.shape[1]).expand_as(ids), None)
    logits = out[0] if isinstance(out, (tuple, list)) else out
    return logits.detach().double().flatten(0, -2)


@torch.no_grad()
def agreement(reference: Callable, quantized: Callable, ids: torch.Tensor) -> Agreement:
    """Compare two decoders (``step(ids, positions, past) -> (logits, cache)``) on the token batch ``ids`` (B, T)."""
    if ids.dim() != 2 or ids.numel() == 0:
        raise ValueError(f"ids must be a non-empty (batch, seq) tensor, got shape {tuple(ids.shape)}")
    ref, got = _logits(reference, ids), _logits(quantized, ids)
    if ref.shape != got.shape:
        raise ValueError(f"the models disagree on the logits' shape: {tuple(ref.shape)} vs {tuple(got.shape)}")
    scale = ref.pow(2).mean().sqrt().clamp_min(torch.finfo(torch.float64).tiny)
    diff = got - ref
    log_p, log_q = ref.log_softmax(-1), got.log_softmax(-1)
    return Agreement(
        positions=ref.shape[0],
        max_abs_error=float(diff.abs().max() / scale),
        rms_error=float(diff.pow(2).mean().sqrt() / scale),
        top1=float((ref.argmax(-1) == got.argmax(-1)).double().mean()),
        kl=float((log_p.exp() * (log_p - log_q)).sum(-1).mean()),
    )
