"""TaperNorm: a normalization layer that a global gate turns into a fixed map.

docs/method.md §2–§4. With gate ``g``::

    RMS:  y = g · (x / r(x)) ⊙ γ  +  (1 − g) · c · x ⊙ γ̃
    LN:   y = g · (x̄ / σ(x)) ⊙ γ  +  (1 − g) · c · x̄ ⊙ γ̃  +  β

At ``g = 1`` the module *is* ``nn.RMSNorm`` / ``nn.LayerNorm`` (it calls the same
fused op, so the outputs are bit-identical). At ``g = 0`` it is the fixed map
``x ⊙ (c·γ̃)`` (LN: ``x̄ ⊙ (c·γ̃) + β``) and computes no per-token statistics at
all: the forward takes a different Python branch rather than multiplying the
normalized branch by zero, which is what lets ``taperfx.fold`` remove it.

The gate is a 0-dim buffer (so it lives in ``state_dict`` and safetensors) mirrored
by a Python float that picks the branch. Between the two ends the blend reads the
buffer as a tensor, so a compiled training step does not recompile as g decays.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from taperfx.errors import TaperfxError

__all__ = ["TaperNorm", "TaperRMSNorm", "TaperLayerNorm", "CalibrationError"]


class CalibrationError(TaperfxError, RuntimeError):
    """The calibration state does not allow what was asked (exit 2); ``code`` says why.

    Codes: ``not_calibrated`` (a gate below 1 before ``start_taper``),
    ``no_calibration_batch`` (``start_taper`` before any training-mode forward at
    g = 1), ``nonfinite_calibration`` (the EMAs hold NaN/Inf, so c would be NaN/Inf),
    ``already_calibrated`` (``taperfx.calibrate`` on norms whose c is frozen).
    """

    code = "calibration"
    exit_code = 2


class TaperNorm(nn.Module):
    """Shared machinery of the RMS and LayerNorm variants (gate, calibration).

    Calibration (docs/method.md §4): while ``g = 1`` and the module is in training mode,
    bias-corrected EMAs of ``N`` and ``D`` are accumulated; ``start_taper()``
    freezes ``c = N̂ / (D̂ + δ)`` and copies ``γ̃ ← γ``.
    """

    def __init__(
        self,
        normalized_shape: int,
        eps: float | None,
        *,
        ema_alpha: float = 0.01,
        calib_delta: float = 1e-12,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if isinstance(normalized_shape, (tuple, list, torch.Size)):
            if len(normalized_shape) != 1:
                raise ValueError(
                    f"TaperNorm normalizes over the last axis only; got normalized_shape={tuple(normalized_shape)}"
                )
            normalized_shape = normalized_shape[0]
        if int(normalized_shape) <= 0:
            raise ValueError(f"normalized_shape must be a positive int, got {normalized_shape}")
        if not 0.0 < ema_alpha <= 1.0:
            raise ValueError(f"ema_alpha must lie in (0, 1], got {ema_alpha}")
        self.normalized_shape = (int(normalized_shape),)
        self.eps = eps
        self.ema_alpha = float(ema_alpha)
        self.calib_delta = float(calib_delta)
        factory = {"device": device, "dtype": dtype}
        d = self.normalized_shape[0]
        self.weight = nn.Parameter(torch.ones(d, **factory))
        self.weight_tilde = nn.Parameter(torch.ones(d, **factory))
        self.register_buffer("c", torch.ones((), **factory))
        self.register_buffer("gate", torch.ones((), **factory))
        # Calibration state is kept in float32 whatever the model's dtype.
        self.register_buffer("ema_num", torch.zeros((), device=device, dtype=torch.float32))
        self.register_buffer("ema_den", torch.zeros((), device=device, dtype=torch.float32))
        self.register_buffer("ema_steps", torch.zeros((), device=device, dtype=torch.int64))
        self.register_buffer("tapering", torch.zeros((), device=device, dtype=torch.bool))
        self._gate_value = 1.0
        self._tapering = False

    # -- gate ---------------------------------------------------------------------------
    @property
    def gate_value(self) -> float:
        return self._gate_value

    def set_gate(self, g: float) -> None:
        g = float(g)
        if not (0.0 <= g <= 1.0) or math.isnan(g):
            raise ValueError(f"gate must lie in [0, 1], got {g}")
        if g < 1.0 and not self._tapering:
            raise CalibrationError(
                "gate < 1 before start_taper(): c is not calibrated yet; call taperfx.start_taper(model) first",
                "not_calibrated",
            )
        self._gate_value = g
        self.gate.fill_(g)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._gate_value = float(self.gate)
        self._tapering = bool(self.tapering)

    # -- calibration ----------------------------------------------------------------------
    @property
    def is_calibrated(self) -> bool:
        """True once ``start_taper`` froze ``c`` (restored from ``state_dict``): the gate may leave 1."""
        return self._tapering

    @property
    def calibrated_c(self) -> torch.Tensor:
        """``N̂ / (D̂ + δ)`` from the current EMAs (bias correction cancels but for δ)."""
        steps = int(self.ema_steps)
        if steps == 0:
            raise CalibrationError(
                f"{type(self).__name__} saw no training batch at g = 1, so c cannot be calibrated; "
                "run a few training-mode forwards before start_taper()",
                "no_calibration_batch",
            )
        correction = 1.0 - (1.0 - self.ema_alpha) ** steps
        num = self.ema_num / correction
        den = self.ema_den / correction
        return num / (den + self.calib_delta)

    def frozen_c(self) -> torch.Tensor:
        """The ``c`` that ``start_taper`` would freeze now, in ``c``'s dtype; refuses NaN/Inf.

        A calibration batch with non-finite activations poisons the EMAs for good
        (NaN never decays), and a NaN c would only surface later as NaN outputs or a
        failed fold; refusing here names the cause.
        """
        c = self.calibrated_c.to(self.c.dtype)
        if not bool(torch.isfinite(c)):
            raise CalibrationError(
                f"{type(self).__name__}: calibration gave c = {float(c)} (EMA numerator {float(self.ema_num)}, "
                f"denominator {float(self.ema_den)}): a calibration batch had non-finite activations",
                "nonfinite_calibration",
            )
        return c

    def start_taper(self) -> None:
        """Freeze ``c`` from the EMAs and copy ``γ̃ ← γ`` (idempotent)."""
        if self._tapering:
            return
        c = self.frozen_c()
        with torch.no_grad():
            self.c.copy_(c)
            self.weight_tilde.copy_(self.weight)
        self.tapering.fill_(True)
        self._tapering = True

    def _observe(self, x: torch.Tensor) -> None:
        # Subclasses define _calibration_stats(x) -> (N, D) for one batch (docs/method.md §4).
        num, den = self._calibration_stats(x.detach())
        a = self.ema_alpha
        with torch.no_grad():
            self.ema_num.mul_(1 - a).add_(a * num)
            self.ema_den.mul_(1 - a).add_(a * den)
            self.ema_steps.add_(1)

    # -- forward --------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.normalized_shape[0]:
            raise ValueError(
                f"{type(self).__name__} expects last dimension {self.normalized_shape[0]}, got shape {tuple(x.shape)}"
            )
        g = self._gate_value
        if g == 0.0:
            return self.fixed_map(x)
        if g == 1.0:
            if self.training and not self._tapering:
                self._observe(x)
            return self.norm(x)
        return self.gate * self.norm(x) + (1.0 - self.gate) * self.fixed_map(x)

    def scale(self) -> torch.Tensor:
        """The per-feature scale ``s = c · γ̃`` of the g = 0 map."""
        return self.c * self.weight_tilde

    def extra_repr(self) -> str:
        return f"{self.normalized_shape[0]}, eps={self.eps}, gate={self._gate_value:g}"


class TaperRMSNorm(TaperNorm):
    """TaperNorm, RMS variant (paper eq. 3). ``eps=None`` means ``finfo(x.dtype).eps``, as nn.RMSNorm."""

    def __init__(self, normalized_shape: int, eps: float | None = None, **kwargs) -> None:
        super().__init__(normalized_shape, eps, **kwargs)

    def norm(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.normalized_shape, self.weight, self.eps)

    def fixed_map(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale()

    def _calibration_stats(self, x):
        eps = torch.finfo(x.dtype).eps if self.eps is None else self.eps
        x = x.float()
        sq = x.square()
        r = torch.sqrt(sq.mean(-1) + eps)
        g2 = self.weight.detach().float().square()
        weighted = (sq * g2).sum(-1)
        return (weighted / r).mean(), weighted.mean()


class TaperLayerNorm(TaperNorm):
    """TaperLN (paper eq. 6): LayerNorm with bias β that tapers to ``x̄ ⊙ (c·γ̃) + β``."""

    def __init__(self, normalized_shape: int, eps: float = 1e-5, bias: bool = True, **kwargs) -> None:
        super().__init__(normalized_shape, eps, **kwargs)
        factory = {"device": kwargs.get("device"), "dtype": kwargs.get("dtype")}
        self.bias = nn.Parameter(torch.zeros(self.normalized_shape, **factory)) if bias else None

    def norm(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)

    def fixed_map(self, x: torch.Tensor) -> torch.Tensor:
        y = (x - x.mean(-1, keepdim=True)) * self.scale()
        return y if self.bias is None else y + self.bias

    def _calibration_stats(self, x):
        x = x.float()
        xc = x - x.mean(-1, keepdim=True)
        sq = xc.square()
        sigma = torch.sqrt(sq.mean(-1) + self.eps)
        g2 = self.weight.detach().float().square()
        weighted = (sq * g2).sum(-1)
        return (weighted / sigma).mean(), weighted.mean()
