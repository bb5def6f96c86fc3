"""Turn any model's normalization layers into TaperNorms, and drive them from outside.

``convert`` swaps modules in place and keeps their weights. It recognises
``nn.RMSNorm``, ``nn.LayerNorm`` and, by behaviour, RMSNorm classes of other
libraries (Hugging Face's ``LlamaRMSNorm`` and the like): a leaf module with a 1-D
``weight`` and an epsilon attribute whose output, on a probe input, equals
``x / r(x) ⊙ weight``. Norms that look alike but compute something else (Gemma's
``1 + weight``) fail the probe and are left alone rather than converted wrongly.
"""

from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from taperfx.norms import TaperLayerNorm, TaperNorm, TaperRMSNorm

__all__ = ["convert", "set_gate", "start_taper", "tapernorms", "find_norms", "find_final_norm"]

_EPS_ATTRS = ("eps", "variance_epsilon", "epsilon")
MODES = ("internal", "all")


def _eps_of(module: nn.Module) -> float | None:
    for name in _EPS_ATTRS:
        if hasattr(module, name):
            return getattr(module, name)
    return None


def _behaves_like_rmsnorm(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1 or weight.is_meta:
        return False
    if not any(hasattr(module, n) for n in _EPS_ATTRS) or list(module.children()):
        return False
    if getattr(module, "bias", None) is not None:
        return False
    d = weight.shape[0]
    eps = _eps_of(module)
    probe = torch.randn(3, d, generator=torch.Generator().manual_seed(0)).to(weight.device, weight.dtype) * 3.0
    with torch.no_grad():
        try:
            got = module(probe)
        except Exception:  # a module that cannot run on a plain (N, d) tensor is not a norm we know
            return False
        want = F.rms_norm(probe.float(), (d,), weight.float(), eps)
    tol = 1e-5 if weight.dtype == torch.float32 else 2e-2
    return (
        isinstance(got, torch.Tensor)
        and got.shape == want.shape
        and torch.allclose(got.float(), want, atol=tol, rtol=tol)
    )


def _norm_kind(module: nn.Module) -> str | None:
    if isinstance(module, TaperNorm):
        return None
    if isinstance(module, nn.LayerNorm):
        return "ln"
    if isinstance(module, nn.RMSNorm) or _behaves_like_rmsnorm(module):
        return "rms"
    return None


def find_norms(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every normalization layer (plain or TaperNorm) of ``model``, in registration order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, TaperNorm) or _norm_kind(m)]


def find_final_norm(model: nn.Module) -> str:
    """Name of the final norm: the last norm registered outside a repeated block.

    Decoder stacks keep their blocks in an ``nn.ModuleList`` and the final norm
    beside it (``norm``, ``ln_f``, ``model.norm``); the last norm outside any list
    is the one that feeds the output projection.
    """
    norms = find_norms(model)
    if not norms:
        raise ValueError(f"{type(model).__name__} has no normalization layer (RMSNorm, LayerNorm or TaperNorm)")
    containers = [n for n, m in model.named_modules() if n and isinstance(m, (nn.ModuleList, nn.Sequential))]
    outside = [n for n, _ in norms if not any(n.startswith(c + ".") for c in containers)]
    return (outside or [n for n, _ in norms])[-1]


def _replacement(module: nn.Module, kind: str) -> TaperNorm:
    weight = getattr(module, "weight", None)
    factory = {"device": None, "dtype": None}
    if isinstance(weight, torch.Tensor):
        factory = {"device": weight.device, "dtype": weight.dtype}
    if kind == "ln":
        d = module.normalized_shape[-1]
        new = TaperLayerNorm(d, eps=module.eps, bias=module.bias is not None, **factory)
    else:
        d = weight.shape[0] if weight is not None else module.normalized_shape[-1]
        new = TaperRMSNorm(d, eps=_eps_of(module), **factory)
    with torch.no_grad():
        if weight is not None:
            new.weight.copy_(weight)
            new.weight_tilde.copy_(weight)
        if kind == "ln" and module.bias is not None:
            new.bias.copy_(module.bias)
    new.train(module.training)
    return new


def convert(model: nn.Module, mode: str = "internal", *, final_norm: str | None = None) -> nn.Module:
    """Replace ``model``'s norms by TaperNorms in place and return ``model``.

    ``mode="internal"`` tapers every norm but the final one (the scale anchor,
    SPEC §6); ``mode="all"`` tapers that one too. ``final_norm`` names the final
    norm when the registration-order rule of ``find_final_norm`` does not fit.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    norms = [(n, m) for n, m in model.named_modules() if n and _norm_kind(m)]
    if not norms and not any(isinstance(m, TaperNorm) for m in model.modules()):
        raise ValueError(
            f"convert() found no normalization layer in {type(model).__name__}: "
            "expected nn.RMSNorm, nn.LayerNorm or an RMSNorm-like module (a 1-D weight and an eps attribute)"
        )
    final = final_norm if final_norm is not None else find_final_norm(model)
    if final_norm is not None and final_norm not in dict(model.named_modules()):
        raise ValueError(f"final_norm={final_norm!r} is not a submodule of {type(model).__name__}")
    for name, module in norms:
        if mode == "internal" and name == final:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, _replacement(module, _norm_kind(module)))
    return model


def tapernorms(model: nn.Module) -> Iterator[TaperNorm]:
    return (m for m in model.modules() if isinstance(m, TaperNorm))


def _require_tapernorms(model: nn.Module) -> list[TaperNorm]:
    found = list(tapernorms(model))
    if not found:
        raise ValueError(f"{type(model).__name__} has no TaperNorm; call taperfx.convert(model) first")
    return found


@torch.no_grad()
def set_gate(model: nn.Module, g: float) -> None:
    """Set the one global gate of every TaperNorm in ``model`` (``0 <= g <= 1``)."""
    g = float(g)
    if not 0.0 <= g <= 1.0:
        raise ValueError(f"gate must lie in [0, 1], got {g}")
    for m in _require_tapernorms(model):
        m.set_gate(g)


def _all_reduce_calibration(norms: list[TaperNorm]) -> None:
    """Average the EMA statistics across data-parallel ranks so every rank freezes the same c."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    world = torch.distributed.get_world_size()
    stats = torch.stack([torch.stack([m.ema_num, m.ema_den]) for m in norms])
    torch.distributed.all_reduce(stats)
    stats /= world
    for m, (num, den) in zip(norms, stats):
        m.ema_num.copy_(num)
        m.ema_den.copy_(den)


@torch.no_grad()
def start_taper(model: nn.Module) -> None:
    """Freeze calibration in every TaperNorm: ``c`` from the EMAs, ``γ̃ ← γ`` (SPEC §4).

    Under ``torch.distributed`` the EMA statistics are averaged across ranks first,
    so that every rank ends with the same ``c``. Idempotent.
    """
    norms = [m for m in _require_tapernorms(model) if not m._tapering]
    if not norms:
        return
    _all_reduce_calibration(norms)
    for m in norms:
        m.start_taper()
