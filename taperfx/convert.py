"""Turn any model's normalization layers into TaperNorms, and drive them from outside.

``convert`` swaps modules in place and keeps their weights. Which modules it takes
is decided by ``taperfx.norm_families.classify`` from what a module computes, not
from its class: ``nn.RMSNorm``, ``nn.LayerNorm`` and the RMSNorm / LayerNorm
classes of other libraries, including those that store the gain as ``γ − 1``
(Gemma). Norm-like modules it cannot replace exactly (a gated ``forward(x, gate)``,
a norm over two axes, other maths) are left as they are, each named in a
``ConversionWarning`` with its code. The README's "Which norms convert" lists the
families.

The model-state API lives here too: ``calibrate`` (observe batches at g = 1, then
``start_taper``), ``start_taper``, ``set_gate``, ``gate_of`` and ``is_calibrated``,
so that no caller needs a TaperNorm's private state.
"""

from __future__ import annotations

import warnings
from typing import Iterable, Iterator

import torch
from torch import nn

from taperfx.errors import BadInput
from taperfx.kinds import NormKind, Protocol
from taperfx.norm_families import Verdict, classify, looks_like_a_norm
from taperfx.norms import CalibrationError, TaperLayerNorm, TaperNorm, TaperRMSNorm

__all__ = [
    "ConversionError",
    "ConversionWarning",
    "convert",
    "calibrate",
    "set_gate",
    "start_taper",
    "gate_of",
    "is_calibrated",
    "tapernorms",
    "find_norms",
    "find_final_norm",
]

MODES = Protocol.tapering()


class ConversionError(BadInput):
    """``convert`` (or a call that needs its result) cannot do what was asked (exit 2); ``code`` says why.

    Codes: ``bad_mode``, ``bad_final_norm`` (not a submodule), ``no_norm`` (nothing
    to convert), ``only_final_norm`` (Internal mode keeps the one norm there is, so
    nothing would taper), ``no_tapernorm`` (a gate or calibration call on a model
    that was never converted).
    """

    code = "conversion"


class ConversionWarning(UserWarning):
    """A norm-like module ``convert`` left as it is: ``module`` names it, ``code`` is a ``Refusal``.

    Built from the message alone (``code`` and ``module`` are attributes), so it
    pickles, as pytest-xdist and multiprocessing need.
    """

    def __init__(self, message: str, code: str = "", module: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.module = module


def _verdicts(model: nn.Module) -> list[tuple[str, nn.Module, Verdict]]:
    """Every norm-like leaf module of ``model`` (TaperNorms excluded) with ``classify``'s verdict."""
    return [(n, m, classify(m)) for n, m in model.named_modules() if n and looks_like_a_norm(m)]


def _norms_among(model: nn.Module, verdicts: list[tuple[str, nn.Module, Verdict]]) -> list[tuple[str, nn.Module]]:
    convertible = {n for n, _, v in verdicts if v.family is not None}
    return [(n, m) for n, m in model.named_modules() if isinstance(m, TaperNorm) or n in convertible]


def find_norms(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every normalization layer (TaperNorm or convertible) of ``model``, in registration order."""
    return _norms_among(model, _verdicts(model))


def find_final_norm(model: nn.Module) -> str:
    """Name of the final norm: the last norm registered outside a repeated block.

    Decoder stacks keep their blocks in an ``nn.ModuleList`` and the final norm
    beside it (``norm``, ``ln_f``, ``model.norm``); the last norm outside any list
    is the one that feeds the output projection.
    """
    return _final_among(model, find_norms(model))


def _final_among(model: nn.Module, norms: list[tuple[str, nn.Module]]) -> str:
    if not norms:
        raise ConversionError(
            f"{type(model).__name__} has no normalization layer (RMSNorm, LayerNorm or TaperNorm)", "no_norm"
        )
    containers = [n for n, m in model.named_modules() if n and isinstance(m, (nn.ModuleList, nn.Sequential))]
    outside = [n for n, _ in norms if not any(n.startswith(c + ".") for c in containers)]
    return (outside or [n for n, _ in norms])[-1]


def _replacement(module: nn.Module, verdict: Verdict, model_tensor: torch.Tensor | None) -> TaperNorm:
    """The TaperNorm equal to ``module`` at g = 1: gain ``w`` (or ``1 + w``), bias and epsilon kept.

    It lives on the module's device and dtype, or the model's (``model_tensor``) for a
    norm without tensors of its own (OLMo's LayerNorm).
    """
    weight = getattr(module, "weight", None)
    weight = weight if isinstance(weight, torch.Tensor) else None
    bias = getattr(module, "bias", None)
    bias = bias if isinstance(bias, torch.Tensor) else None
    like = next(iter([*module.parameters(recurse=False), *module.buffers(recurse=False)]), model_tensor)
    factory = {"device": None, "dtype": None} if like is None else {"device": like.device, "dtype": like.dtype}
    if verdict.family.kind == NormKind.LN:
        eps = verdict.eps if verdict.eps is not None else torch.finfo(torch.float32).eps
        new = TaperLayerNorm(verdict.width, eps=eps, bias=bias is not None, **factory)
    else:
        new = TaperRMSNorm(verdict.width, eps=verdict.eps, **factory)
    with torch.no_grad():
        if weight is not None:
            gain = (weight.float() + 1.0).to(weight.dtype) if verdict.family.offset else weight
            new.weight.copy_(gain)
            new.weight_tilde.copy_(gain)
        if bias is not None:
            new.bias.copy_(bias)
    return new.train(module.training)


def _turn_off_fused_encoder_paths(model: nn.Module) -> None:
    """Make ``nn.TransformerEncoder(Layer)`` call their (Taper)norms instead of reading them.

    Under ``no_grad`` in eval mode, PyTorch's fused encoder path passes
    ``norm1.weight``/``bias``/``eps`` to one kernel that computes a real LayerNorm,
    bypassing the module; it is taken only when ``activation_relu_or_gelu`` is set
    (and, for the stack's nested-tensor path, ``use_nested_tensor``). Clearing both
    on layers that hold a TaperNorm sends them through the ordinary forward, which
    calls ``norm1(x)``; the layer's results are unchanged at g = 1 (it is the
    path PyTorch takes during training).
    """
    for module in model.modules():
        if isinstance(module, nn.TransformerEncoderLayer):
            if isinstance(module.norm1, TaperNorm) or isinstance(module.norm2, TaperNorm):
                module.activation_relu_or_gelu = 0
        elif isinstance(module, nn.TransformerEncoder):
            if any(isinstance(m, TaperNorm) for layer in module.layers for m in (layer.norm1, layer.norm2)):
                module.use_nested_tensor = False


def convert(model: nn.Module, mode: str = "internal", *, final_norm: str | None = None) -> nn.Module:
    """Replace ``model``'s norms by TaperNorms in place and return ``model``.

    ``mode="internal"`` tapers every norm but the final one (the scale anchor,
    docs/method.md §6); ``mode="all"`` tapers that one too. ``final_norm`` names
    the final norm when the registration-order rule of ``find_final_norm`` does not
    fit. Each norm-like module left alone is named in a ``ConversionWarning``.
    """
    if mode not in MODES:
        raise ConversionError(f"mode must be one of {[str(m) for m in MODES]}, got {mode!r}", "bad_mode")
    if final_norm is not None and final_norm not in dict(model.named_modules()):
        raise ConversionError(
            f"final_norm={final_norm!r} is not a submodule of {type(model).__name__}", "bad_final_norm"
        )
    verdicts = _verdicts(model)
    norms = [(n, m, v) for n, m, v in verdicts if v.family is not None]
    already = any(isinstance(m, TaperNorm) for m in model.modules())
    if not norms and not already:
        refused = "; ".join(f"{n} ({type(m).__name__}): {v.refusal}, {v.detail}" for n, m, v in verdicts)
        raise ConversionError(
            f"convert() found no normalization layer it can replace in {type(model).__name__}: expected "
            f"nn.RMSNorm, nn.LayerNorm or a module computing the same (see README 'Which norms convert')"
            + (f"; refused: {refused}" if refused else ""),
            "no_norm",
        )
    final = final_norm if final_norm is not None else _final_among(model, _norms_among(model, verdicts))
    todo = [(n, m, v) for n, m, v in norms if mode == Protocol.ALL or n != final]
    if not todo and not already:
        raise ConversionError(
            f"{type(model).__name__} has one norm ({final}), the final one, which Internal mode keeps as the "
            "scale anchor: nothing would taper; use mode='all' or name another final_norm",
            "only_final_norm",
        )
    for name, module, verdict in verdicts:
        if verdict.family is None:
            warnings.warn(
                ConversionWarning(
                    f"convert() left {name} ({type(module).__name__}) as it is: {verdict.refusal} ({verdict.detail})",
                    str(verdict.refusal),
                    name,
                ),
                stacklevel=2,
            )
    model_tensor = next(model.parameters(), None)
    for name, module, verdict in todo:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, _replacement(module, verdict, model_tensor))
    _turn_off_fused_encoder_paths(model)
    return model


def tapernorms(model: nn.Module) -> Iterator[TaperNorm]:
    return (m for m in model.modules() if isinstance(m, TaperNorm))


def _require_tapernorms(model: nn.Module) -> list[TaperNorm]:
    found = list(tapernorms(model))
    if not found:
        raise ConversionError(
            f"{type(model).__name__} has no TaperNorm; call taperfx.convert(model) first", "no_tapernorm"
        )
    return found


def gate_of(model: nn.Module) -> float | None:
    """The one global gate of ``model``'s TaperNorms, or None if it has none."""
    gates = {m.gate_value for m in tapernorms(model)}
    if len(gates) > 1:
        raise RuntimeError(f"TaperNorms disagree on the gate: {sorted(gates)}; set it with taperfx.set_gate")
    return gates.pop() if gates else None


def is_calibrated(model: nn.Module) -> bool:
    """True when ``model`` has TaperNorms and every one has its ``c`` frozen (the gate may leave 1)."""
    norms = list(tapernorms(model))
    return bool(norms) and all(m.is_calibrated for m in norms)


@torch.no_grad()
def set_gate(model: nn.Module, g: float) -> None:
    """Set the one global gate of every TaperNorm in ``model`` (``0 <= g <= 1``); all or none."""
    g = float(g)
    if not 0.0 <= g <= 1.0:
        raise ValueError(f"gate must lie in [0, 1], got {g}")
    norms = _require_tapernorms(model)
    if g < 1.0 and not all(m.is_calibrated for m in norms):
        raise CalibrationError(
            f"gate {g:g} < 1 before start_taper(): c is not calibrated yet; call taperfx.start_taper(model) "
            "or taperfx.calibrate(model, batches) first",
            "not_calibrated",
        )
    for m in norms:
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
    """Freeze calibration in every TaperNorm: ``c`` from the EMAs, ``γ̃ ← γ`` (docs/method.md §4).

    Under ``torch.distributed`` the EMA statistics are averaged across ranks first,
    so that every rank ends with the same ``c``. Every ``c`` is computed and checked
    before any is frozen: a norm without a calibration batch, or with NaN/Inf
    statistics, raises ``CalibrationError`` and leaves the whole model uncalibrated.
    Idempotent.
    """
    norms = [m for m in _require_tapernorms(model) if not m.is_calibrated]
    if not norms:
        return
    _all_reduce_calibration(norms)
    names = {id(m): n for n, m in model.named_modules()}
    for m in norms:
        try:
            m.frozen_c()
        except CalibrationError as exc:
            raise CalibrationError(f"{names.get(id(m), type(m).__name__)}: {exc}", exc.code) from None
    for m in norms:
        m.start_taper()


def _run(model: nn.Module, batch) -> None:
    """One forward: a dict is keyword arguments (a tokenizer's output), a tuple or list positional ones."""
    if isinstance(batch, dict):
        model(**batch)
    elif isinstance(batch, (tuple, list)):
        model(*batch)
    else:
        model(batch)


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable) -> nn.Module:
    """Calibrate a converted model and start its taper: the gate may then leave 1.

    Runs ``model`` on every batch (a tensor is one argument, a tuple or list several
    positional ones, a dict keyword arguments) in training mode at g = 1, without gradients, so that every
    TaperNorm accumulates its statistics, then ``start_taper`` freezes ``c``. The
    model's training mode is restored. Refuses a model whose norms are already
    calibrated (the batches would be ignored), and an empty ``batches``.
    """
    norms = _require_tapernorms(model)
    if any(m.is_calibrated for m in norms):
        raise CalibrationError(
            "calibrate(): the model's TaperNorms are already calibrated (c is frozen); these batches would be ignored",
            "already_calibrated",
        )
    was_training = model.training
    model.train()
    seen = 0
    try:
        for batch in batches:
            _run(model, batch)
            seen += 1
    finally:
        model.train(was_training)
    if seen == 0:
        raise CalibrationError("calibrate() was given no batch", "no_calibration_batch")
    start_taper(model)
    return model
