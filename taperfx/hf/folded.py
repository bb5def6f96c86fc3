"""A folded model as a plain ``transformers`` checkpoint, and the helper that loads it back.

After folding, the tapered norms are gone: their scale (and, for TaperLN, the mean
removal and β) lives in the weights of the layers they fed. The stock class still
constructs those norm modules, so the directory records their names in
``config.json`` under ``taperfx_identity_norms``; ``load_folded`` calls the stock
``from_pretrained`` and then replaces exactly those modules by ``nn.Identity``::

    from taperfx.hf import load_folded
    model = load_folded("gpt2-tapered-folded")       # a GPT2LMHeadModel, no ln_1/ln_2

Without the helper the same is three lines: ``from_pretrained``, then
``setattr(parent, child, nn.Identity())`` for every name in that list.

A folded TaperLN adds ``W β`` as a bias to layers that had none; the one such
layer the stock classes have, the bias-free head fed by the final norm of an
All-Taper model, is listed under ``taperfx_added_biases`` and ``load_folded`` gives
it back its saved bias (``from_pretrained`` has no slot for it and drops it).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from taperfx.atomic import atomic_dir
from taperfx.errors import BadInput, DataError
from taperfx.models.hf_causal_lm import unwrap
from taperfx.models.hf_extra import transformers
from taperfx.norms import TaperNorm
from taperfx.passes import FoldReport, fold_module

__all__ = ["IDENTITY_NORMS_KEY", "ADDED_BIASES_KEY", "save_folded", "load_folded"]

IDENTITY_NORMS_KEY = "taperfx_identity_norms"
ADDED_BIASES_KEY = "taperfx_added_biases"


def save_folded(
    model: nn.Module, out_dir: str | os.PathLike, *, tokenizer_from: str | os.PathLike | None = None
) -> FoldReport:
    """Fold ``model`` (every TaperNorm at g = 0) and write it to ``out_dir`` with ``save_pretrained``.

    Refuses, naming the norms and the fold's reasons, when a TaperNorm would stay:
    a stock class cannot hold one. ``tokenizer_from`` (a directory) adds that
    tokenizer. The directory appears complete or not at all.
    """
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise BadInput(f"{out} exists and is not empty; choose a new directory for the folded checkpoint")
    hf = unwrap(model)
    ids = torch.zeros(2, 4, dtype=torch.long, device=next(hf.parameters()).device)
    training = hf.training
    try:
        folded, report = fold_module(hf.eval(), (ids,), {"use_cache": False}, untie_shared=True)
    finally:
        hf.train(training)
    stayed = [name for name, m in folded.named_modules() if isinstance(m, TaperNorm)]
    if stayed:
        reasons = "\n".join(f"  {s.name}: {s.reason}" for s in report.skipped)
        raise BadInput(f"cannot write a stock transformers checkpoint: {stayed} would stay TaperNorms\n{reasons}")
    added_biases = [p.removesuffix(".bias") for p in report.params_added if _is_linear_bias(folded, p)]
    if len(added_biases) != len(report.params_added):
        raise BadInput(f"folding added {report.params_added}, which the stock {type(hf).__name__} has no place for")
    output, embedding = folded.get_output_embeddings(), folded.get_input_embeddings()
    folded.config.tie_word_embeddings = output is not None and output.weight is embedding.weight
    setattr(folded.config, IDENTITY_NORMS_KEY, [f.name for f in report.folded])
    setattr(folded.config, ADDED_BIASES_KEY, added_biases)

    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(out) as tmp:  # replaces the empty directory checked above, if any
        folded.save_pretrained(tmp)
        if tokenizer_from is not None:
            transformers().AutoTokenizer.from_pretrained(tokenizer_from).save_pretrained(tmp)
    return report


def load_folded(path: str | os.PathLike, **from_pretrained_kwargs) -> nn.Module:
    """``AutoModelForCausalLM.from_pretrained(path)`` with the folded norms replaced by identity.

    A directory without ``taperfx_identity_norms`` loads as it is, so this also
    reads ordinary checkpoints. Any weight that is missing for another reason, or
    left over, is an error rather than a silently re-initialised layer.
    """
    model, info = transformers().AutoModelForCausalLM.from_pretrained(
        path, output_loading_info=True, **from_pretrained_kwargs
    )
    names = list(getattr(model.config, IDENTITY_NORMS_KEY, None) or [])
    for name in names:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, nn.Identity())
    folded_params = {f"{name}.{p}" for name in names for p in ("weight", "bias")}
    added = [f"{name}.bias" for name in getattr(model.config, ADDED_BIASES_KEY, None) or []]
    unexplained = sorted(set(info["missing_keys"]) - folded_params)
    # A folded norm's own tensors may still be in the files (an in-place fold leaves their bytes): explained.
    folded_prefixes = tuple(f"{name}." for name in names)
    unexpected = sorted(k for k in set(info["unexpected_keys"]) - set(added) if not k.startswith(folded_prefixes))
    if unexplained or unexpected or info["mismatched_keys"]:
        raise DataError(
            f"{path}: weights do not fit {type(model).__name__}: missing {unexplained}, "
            f"unexpected {unexpected}, mismatched {info['mismatched_keys']}"
        )
    for key, value in _read_saved(Path(path), added).items():
        linear = model.get_submodule(key.removesuffix(".bias"))
        linear.bias = nn.Parameter(value.to(linear.weight), requires_grad=linear.weight.requires_grad)
    return model.eval()


def _is_linear_bias(model: nn.Module, param: str) -> bool:
    owner, _, field = param.rpartition(".")
    return field == "bias" and isinstance(model.get_submodule(owner), nn.Linear)


def _read_saved(path: Path, keys: list[str]) -> dict[str, torch.Tensor]:
    """The tensors ``keys`` from the safetensors file(s) ``save_pretrained`` wrote in ``path``."""
    from safetensors import safe_open

    index = path / "model.safetensors.index.json"
    files = json.loads(index.read_text())["weight_map"] if index.is_file() else {}
    out = {}
    for key in keys:
        with safe_open(path / files.get(key, "model.safetensors"), framework="pt") as f:
            if key not in f.keys():
                raise DataError(f"{path}: {ADDED_BIASES_KEY} lists {key}, which the checkpoint does not hold")
            out[key] = f.get_tensor(key)
    return out
