"""Fixed-target scale loss (docs/method.md §7, paper eq. 5): an explicit scale anchor.

Without a final norm, cross-entropy rewards growing the pre-logit scale ("logit
chasing"). ``ScaleAnchor`` watches the input ``h`` of the final norm through a
forward pre-hook, keeps a bias-corrected EMA of the batch-mean per-token scale
``s(h)`` (RMS: ``r(h)``, LN: ``σ(h)``) while the gate is 1, freezes it as ``s*``
when the taper starts, and from then on ``loss()`` is ``mean (s − s*)²``.
"""

from __future__ import annotations

import torch
from torch import nn

from taperfx.convert import find_final_norm
from taperfx.kinds import NormKind
from taperfx.norm_families import classify, norm_eps
from taperfx.norms import TaperLayerNorm, TaperNorm

__all__ = ["ScaleAnchor", "token_scale"]


def token_scale(h: torch.Tensor, kind: str, eps: float | None = None) -> torch.Tensor:
    """Per-token scale of ``h`` (…, d): ``r(h)`` for ``kind="rms"``, ``σ(h)`` for ``kind="ln"``."""
    h = h.float()
    if eps is None:
        eps = torch.finfo(torch.float32).eps
    if kind == NormKind.LN:
        h = h - h.mean(-1, keepdim=True)
    elif kind != NormKind.RMS:
        raise ValueError(f"kind must be one of {[str(k) for k in NormKind]}, got {kind!r}")
    return torch.sqrt(h.square().mean(-1) + eps)


def _kind_of(norm: nn.Module) -> NormKind:
    """RMS or LN for the final norm, TaperNorm or any norm ``convert`` recognises."""
    if isinstance(norm, TaperNorm):
        return NormKind.LN if isinstance(norm, TaperLayerNorm) else NormKind.RMS
    verdict = classify(norm)
    if verdict.family is None:
        raise ValueError(f"{type(norm).__name__} is not a norm whose input scale can be anchored: {verdict.refusal}")
    return verdict.family.kind


class ScaleAnchor(nn.Module):
    """Tracks ``s(h)`` on the final norm's input and turns it into the fixed-target loss.

    Use ``ScaleAnchor.attach(model)`` once; call ``freeze()`` at taper start (the
    trainer does both) and add ``weight * anchor.loss()`` to the objective. Its
    buffers (EMA, step count, target) are in ``state_dict`` for checkpoints.
    """

    def __init__(self, kind: str = NormKind.RMS, eps: float | None = None, ema_alpha: float = 0.01) -> None:
        super().__init__()
        if kind not in tuple(NormKind):
            raise ValueError(f"kind must be one of {[str(k) for k in NormKind]}, got {kind!r}")
        self.kind, self.eps, self.ema_alpha = NormKind(kind), eps, float(ema_alpha)
        self.register_buffer("ema", torch.zeros((), dtype=torch.float32))
        self.register_buffer("ema_steps", torch.zeros((), dtype=torch.int64))
        self.register_buffer("target", torch.zeros((), dtype=torch.float32))
        self.register_buffer("frozen", torch.zeros((), dtype=torch.bool))
        self._last: torch.Tensor | None = None
        self._handle = None
        # Python mirror of ``frozen``: the hook runs inside compiled models, where reading
        # the buffer as a bool would break the graph on every step.
        self._frozen = False

    @classmethod
    def attach(cls, model: nn.Module, ema_alpha: float = 0.01, final_norm: str | None = None) -> "ScaleAnchor":
        name = final_norm or find_final_norm(model)
        norm = model.get_submodule(name)
        anchor = cls(_kind_of(norm), norm_eps(norm, None), ema_alpha)
        anchor.to(next(model.parameters()).device)
        anchor._handle = norm.register_forward_pre_hook(anchor._hook)
        return anchor

    def detach_hook(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _hook(self, module: nn.Module, args: tuple) -> None:
        self._last = token_scale(args[0], self.kind, self.eps)
        if module.training and not self._frozen:
            with torch.no_grad():
                a = self.ema_alpha
                self.ema.mul_(1 - a).add_(a * self._last.detach().mean())
                self.ema_steps.add_(1)

    @property
    def estimate(self) -> torch.Tensor:
        """Bias-corrected EMA of the batch-mean scale (the target-to-be)."""
        steps = int(self.ema_steps)
        if steps == 0:
            raise RuntimeError("ScaleAnchor has seen no training batch; cannot estimate the target scale")
        return self.ema / (1.0 - (1.0 - self.ema_alpha) ** steps)

    @torch.no_grad()
    def freeze(self) -> None:
        """Freeze ``s*`` from the EMA (idempotent)."""
        if self._frozen:
            return
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(self.ema)
            self.ema /= torch.distributed.get_world_size()
        self.target.copy_(self.estimate)
        self.frozen.fill_(True)
        self._frozen = True

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._frozen = bool(self.frozen)

    @property
    def last_scale(self) -> torch.Tensor:
        """Per-token ``s(h)`` from the most recent forward (for logging)."""
        if self._last is None:
            raise RuntimeError("ScaleAnchor has not seen a forward pass yet")
        return self._last

    def loss(self) -> torch.Tensor:
        """``mean (s − s*)²`` over the last forward's tokens; 0 before the target is frozen."""
        s = self.last_scale
        if not self._frozen:
            return s.new_zeros(())
        return (s - self.target).square().mean()
