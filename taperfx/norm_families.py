"""Which modules are normalization layers TaperNorm can replace, recognised by what they compute.

Libraries write the same RMSNorm or LayerNorm as many classes (``transformers``
alone has hundreds), with the epsilon under different names and the gain stored
as ``γ`` or as ``γ − 1``. ``classify`` therefore does not trust class names: it
runs a copy of a candidate module (its parameters replaced by random values, so a
zero or unit gain cannot hide a difference) on probe rows of very different
scales, the small ones making the epsilon matter, and accepts it only when the
output equals one of four formulas (docs/method.md §1):

=============  ===============================  ==========================
family         output                           TaperNorm gets
=============  ===============================  ==========================
rms            x / r(x) ⊙ w                     TaperRMSNorm, γ = w
rms_offset     x / r(x) ⊙ (1 + w)   (Gemma)     TaperRMSNorm, γ = 1 + w
ln             x̄ / σ(x) ⊙ w + b                 TaperLayerNorm, γ = w, β = b
ln_offset      x̄ / σ(x) ⊙ (1 + w) + b           TaperLayerNorm, γ = 1 + w, β = b
=============  ===============================  ==========================

A module without a weight has ``w = 1`` (``γ`` then starts at 1); one without a
bias has ``b = 0``. Everything else is refused with a ``Refusal`` code.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass
from enum import StrEnum

import torch
from torch import nn

from taperfx.kinds import NormKind
from taperfx.norms import TaperNorm

__all__ = ["EPS_ATTRIBUTES", "Refusal", "NormFamily", "Verdict", "classify", "norm_eps", "looks_like_a_norm"]

EPS_ATTRIBUTES = ("eps", "variance_epsilon", "epsilon")
_UNSET = object()
_OTHER_STATISTICS = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
    nn.GroupNorm,
    nn.LocalResponseNorm,
)


class Refusal(StrEnum):
    """Why a norm-like module is left as it is (the code in ``ConversionWarning``)."""

    EXTRA_FORWARD_ARGS = "extra_forward_args"  # forward(x, gate) etc.: a TaperNorm takes x alone
    MULTI_AXIS = "multi_axis"  # normalizes, or scales, over more than the last axis
    UNKNOWN_WIDTH = "unknown_width"  # no weight or normalized_shape: works at any width, a TaperNorm needs one
    META_TENSORS = "meta_tensors"  # parameters on the meta device: nothing to probe or copy
    PROBE_FAILED = "probe_failed"  # raised on a plain (rows, d) float tensor
    OTHER_MATHS = "other_maths"  # ran, but computes none of the four formulas


@dataclass(frozen=True)
class NormFamily:
    """What a recognised norm computes: its kind, and whether the gain is stored as ``γ − 1``."""

    kind: NormKind
    offset: bool

    @property
    def name(self) -> str:
        return f"{self.kind}_offset" if self.offset else str(self.kind)


@dataclass(frozen=True)
class Verdict:
    """``classify``'s answer: a family (with the width and epsilon to build from) or a refusal."""

    family: NormFamily | None
    refusal: Refusal | None = None
    detail: str = ""
    width: int = 0
    eps: float | None = None


def norm_eps(module: nn.Module, default=_UNSET):
    """The epsilon of a norm module, whatever its library calls it; ``default`` when it has none.

    Without ``default`` a module with no epsilon attribute raises AttributeError.
    ``None`` is a real value (``nn.RMSNorm``'s: ``finfo(dtype).eps`` at run time).
    """
    for name in EPS_ATTRIBUTES:
        if hasattr(module, name):
            return getattr(module, name)
    if default is _UNSET:
        raise AttributeError(f"{type(module).__name__} has none of the epsilon attributes {EPS_ATTRIBUTES}")
    return default


def looks_like_a_norm(module: nn.Module) -> bool:
    """A leaf module worth probing, or worth a warning when refused: a torch norm class, an
    epsilon attribute, a ``normalized_shape``, or "Norm" in the class name."""
    if isinstance(module, TaperNorm) or list(module.children()):
        return False
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
        return True
    if isinstance(module, _OTHER_STATISTICS):
        return False  # batch, instance or group statistics: not a per-token norm, not what the user meant
    named = "norm" in type(module).__name__.lower()
    return named or hasattr(module, "normalized_shape") or norm_eps(module, None) is not None


def _extra_forward_parameters(module: nn.Module) -> list[str]:
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return []
    return [p.name for p in params[1:]]


def _width(module: nn.Module) -> tuple[int | None, str]:
    """The normalized width, or None with the reason when it spans more than the last axis."""
    shape = getattr(module, "normalized_shape", None)
    if shape is not None:
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        if len(shape) != 1:
            return None, f"normalized_shape={shape}"
    for name in ("weight", "bias"):
        t = getattr(module, name, None)
        if isinstance(t, torch.Tensor) and t.dim() != 1:
            return None, f"{name} has shape {tuple(t.shape)}"
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor):
        return weight.shape[0], ""
    return (shape[0] if shape else None), ""


def _probe(d: int) -> torch.Tensor:
    """Rows of scales 3, 1 and 1e-3 (where an epsilon of 1e-6 changes the result), off-centre
    so that centering shows."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, d, generator=gen, dtype=torch.float64) + 0.7
    scales = torch.tensor([3.0, 3.0, 1.0, 1.0, 1e-3, 1e-3], dtype=torch.float64).unsqueeze(-1)
    return x * scales


def _formula(x: torch.Tensor, family: NormFamily, eps: float | None, w, b) -> torch.Tensor:
    if eps is None:
        eps = torch.finfo(torch.float32).eps
    if family.kind == NormKind.LN:
        x = x - x.mean(-1, keepdim=True)
    y = x / torch.sqrt(x.square().mean(-1, keepdim=True) + eps)
    gain = 1.0 if w is None else (1.0 + w if family.offset else w)
    return y * gain + (0.0 if b is None else b)


def _device_of(module: nn.Module) -> torch.device:
    own = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
    return own[0].device if own else torch.device("cpu")


def _randomised_copy(module: nn.Module) -> nn.Module:
    """A float32 copy on the module's own device (a fused CUDA norm runs where it lives), with
    random gains and biases so that no formula can match by accident of a zero or unit gain."""
    probe = copy.deepcopy(module).float()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in probe.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3 + (0.8 if name == "weight" else 0.0))
    return probe


FAMILIES = tuple(NormFamily(kind, offset) for kind in (NormKind.RMS, NormKind.LN) for offset in (False, True))


def _estimated_eps(x: torch.Tensor, got: torch.Tensor, family: NormFamily, w, b) -> float | None:
    """The epsilon a module without an epsilon attribute (OLMo's LayerNorm) uses, read off the
    probe's small rows as if it computed ``family``, rounded to two significant digits."""
    if family.kind == NormKind.LN:
        x = x - x.mean(-1, keepdim=True)
    gain = 1.0 if w is None else (1.0 + w if family.offset else w)
    small = x[-2:] * gain
    shifted = got[-2:] - (0.0 if b is None else b)
    mask = shifted.abs() > 1e-3
    if not bool(mask.any()):
        return None
    r_squared = (small[mask] / shifted[mask]).square().mean()  # (x ⊙ gain / y)² = mean(x²) + ε
    eps = float(r_squared - x[-2:].square().mean(-1).mean())
    return float(f"{eps:.1e}") if eps > 0 else None


def classify(module: nn.Module) -> Verdict:
    """Which family ``module`` computes (see the module docstring), or why it is refused.

    A module without an epsilon attribute gets the epsilon that reproduces its
    output, when one does (``Verdict.eps``); the replacement uses that value.
    """
    extra = _extra_forward_parameters(module)
    if extra:
        return Verdict(None, Refusal.EXTRA_FORWARD_ARGS, f"forward takes {['x', *extra]}")
    d, why = _width(module)
    if why:
        return Verdict(None, Refusal.MULTI_AXIS, why)
    if d is None:
        return Verdict(None, Refusal.UNKNOWN_WIDTH, "no weight or normalized_shape fixes the width")
    if any(t.is_meta for t in module.parameters(recurse=False)):
        return Verdict(None, Refusal.META_TENSORS, "parameters on the meta device")
    probe = _randomised_copy(module)
    x = _probe(d)
    try:
        with torch.no_grad():
            got = probe(x.float().to(_device_of(module)))
    except Exception as exc:  # any failure on a plain (rows, d) tensor means: not a norm we can replace
        return Verdict(None, Refusal.PROBE_FAILED, f"{type(exc).__name__}: {exc}")
    if not isinstance(got, torch.Tensor) or got.shape != x.shape:
        return Verdict(None, Refusal.OTHER_MATHS, "output is not a tensor of the input's shape")
    got = got.double().cpu()
    w = getattr(probe, "weight", None)
    b = getattr(probe, "bias", None)
    w = w.detach().double().cpu() if isinstance(w, torch.Tensor) else None
    b = b.detach().double().cpu() if isinstance(b, torch.Tensor) else None
    has_eps = any(hasattr(module, name) for name in EPS_ATTRIBUTES)
    for family in FAMILIES:
        eps = norm_eps(module) if has_eps else _estimated_eps(x, got, family, w, b)
        if not has_eps and eps is None:
            continue
        if torch.allclose(got, _formula(x, family, eps, w, b), rtol=1e-4, atol=1e-4):
            return Verdict(family, width=d, eps=eps)
    return Verdict(None, Refusal.OTHER_MATHS, "output matches none of rms, rms_offset, ln, ln_offset")
