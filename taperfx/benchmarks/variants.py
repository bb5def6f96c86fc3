"""The four models the decode benchmark compares, built from one set of random weights.

- ``baseline-handwritten``: real RMSNorm written as the paper's baseline,
  ``x * rsqrt(mean(x²) + eps) * w`` (three or four kernels per norm in eager mode);
- ``baseline-fused``: real RMSNorm through ``nn.RMSNorm`` / ``F.rms_norm``, the
  fastest normalization the backend offers, so no speed-up is claimed against a
  weak baseline;
- ``taper-unfused``: Internal-Taper at g = 0 with the fixed scalings kept as one
  explicit elementwise multiply ``x * s`` each (the paper's "unfused");
- ``taper-fused``: the same model after ``taperfx.fold_module``: internal norms are
  gone, their scales live in the q/k/v and gate/up weights.

Every variant keeps the final norm as a real RMSNorm (Internal-Taper), shares the
embeddings and every linear weight with the baseline, and differs only in how the
internal normalization is computed.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

import taperfx
from taperfx.models import ModelConfig, build_model

__all__ = ["VARIANTS", "HandwrittenRMSNorm", "FixedScale", "build_variants"]

VARIANTS = ("baseline-handwritten", "baseline-fused", "taper-unfused", "taper-fused")


class HandwrittenRMSNorm(nn.Module):
    """The paper's baseline RMSNorm, as most training code writes it."""

    def __init__(self, norm: nn.RMSNorm) -> None:
        super().__init__()
        self.weight = nn.Parameter(norm.weight.detach().clone())
        self.eps = norm.eps if norm.eps is not None else torch.finfo(norm.weight.dtype).eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class FixedScale(nn.Module):
    """A gate-zero TaperNorm exported as one explicit multiply by ``s = c·γ̃``."""

    def __init__(self, norm: taperfx.TaperRMSNorm) -> None:
        super().__init__()
        self.register_buffer("s", norm.scale().detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.s


def _swap_internal_norms(model: nn.Module, make) -> nn.Module:
    final = taperfx.find_final_norm(model)
    for name, norm in taperfx.find_norms(model):
        if name != final:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, make(norm))
    return model


@torch.no_grad()
def build_variants(
    config: ModelConfig, device: torch.device, dtype: torch.dtype, seed: int = 0, calibration_tokens: int = 64
) -> dict[str, nn.Module]:
    """The four variants, in eval mode on ``device``/``dtype``, with identical weights.

    The taper variants go through the real calibrate → start_taper → g = 0 path, but
    then get ``c = 1`` and ``γ̃ ~ γ·(1 + 0.1·N(0, 1))``: c calibrated on an untrained
    network (``1/r(x)`` ≈ 50 at this init) would grow the residual stream by that much
    per block and overflow within eight layers, leaving nothing to check the fold on.
    """
    if config.arch != "llama":
        raise ValueError("the decode benchmark compares RMSNorm variants: it needs a llama-style config")
    torch.manual_seed(seed)
    baseline = build_model(config).eval()
    handwritten = _swap_internal_norms(copy.deepcopy(baseline), HandwrittenRMSNorm)

    tapered = taperfx.convert(copy.deepcopy(baseline), "internal")
    calib = torch.randint(0, config.vocab_size, (4, min(calibration_tokens, config.max_seq_len)))
    taperfx.calibrate(tapered, [calib])
    gen = torch.Generator().manual_seed(seed + 1)
    for norm in taperfx.tapernorms(tapered):
        norm.c.fill_(1.0)
        norm.weight_tilde.mul_(1 + 0.1 * torch.randn(norm.weight_tilde.shape, generator=gen))
    taperfx.set_gate(tapered, 0.0)
    tapered.eval()
    unfused = _swap_internal_norms(copy.deepcopy(tapered), FixedScale)
    # No call-path guard: the benchmark times plain modules (and compiles them); _check_fused_matches_unfused
    # compares the fused model with the unfused one on the decode path itself.
    fused, report = taperfx.fold_module(tapered, (calib[:1, :8],), guard_calls=False)
    if len(report.folded) != 2 * config.n_layers:
        raise RuntimeError(
            f"fold_module folded {len(report.folded)} of {2 * config.n_layers} internal norms:\n{report}"
        )

    models = {
        "baseline-handwritten": handwritten,
        "baseline-fused": baseline,
        "taper-unfused": unfused,
        "taper-fused": fused,
    }
    return {name: m.to(device=device, dtype=dtype).eval() for name, m in models.items()}
