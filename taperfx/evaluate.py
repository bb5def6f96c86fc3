"""Mean next-token cross-entropy on held-out token windows, for every kind of model taperfx writes.

This is the number the paper's Table 3 reports, computed one way for every model so
that a vanilla and a tapered one are compared by one command: a taperfx run or
checkpoint (folded on disk by ``taperfx fold CKPT -o DIR``, or not), a folded
``.pt2`` program (``taperfx fold``), or a Hugging Face directory (plain, or folded
by ``taperfx export hf``).

By default the windows are the trainer's validation windows (its data, batch size,
``eval_batches`` and context, recorded in the checkpoint and in the folded
program), so ``taperfx eval RUN`` reproduces the run's ``val_loss``. Tapered
checkpoints whose norms are calibrated are evaluated at g = 0, as the
trainer's ``val_loss`` is (docs/method.md §5).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from taperfx.checkpoint_fold import load_inference_model
from taperfx.convert import gate_of, is_calibrated, set_gate
from taperfx.errors import DataError
from taperfx.export.program import TOKENIZER_KEY, decoder_layers, load_program
from taperfx.jsonfile import read_json_object
from taperfx.models import source_from_dict
from taperfx.train.checkpoint import CONFIG_FILE
from taperfx.train.tokens import PreparedData, TokenStream, tokenizer_fingerprint

__all__ = ["EvalTarget", "Windows", "check_tokenizer", "cross_entropy", "load_for_eval", "trainer_windows"]


@dataclass(frozen=True)
class Windows:
    """Which held-out windows to score: the data directory, and batches × batch_size windows of context tokens."""

    data: str | None
    batch_size: int
    batches: int
    context: int | None


@dataclass(frozen=True)
class EvalTarget:
    forward: Callable[[torch.Tensor], torch.Tensor]  # token ids (B, T) -> logits (B, T, V)
    vocab_size: int
    max_seq_len: int | None
    windows: Windows | None  # the trainer's validation windows, when the model records them
    gate: float | None
    device: torch.device
    tokenizer: str | None = None  # tokenizer_fingerprint of the tokenizer the model was trained with, where known


def trainer_windows(train: dict | None) -> Windows | None:
    """The validation windows of the training config ``train`` (a ``TrainConfig.to_dict()``)."""
    if not train:
        return None
    windows = Windows(train.get("data"), train.get("batch_size"), train.get("eval_batches"), train.get("context"))
    counts = (windows.batch_size, windows.batches, 1 if windows.context is None else windows.context)
    if not isinstance(windows.data, str) or not all(isinstance(n, int) and n > 0 for n in counts):
        raise DataError(
            f"the recorded training windows (data, batch_size, eval_batches, context) are damaged: {windows}",
            code="bad-checkpoint",
        )
    return windows


def _folded_quantized(model: nn.Module, quantize) -> nn.Module:
    """``model`` folded (when its norms are at g = 0) and quantized: the order a deployment applies them."""
    from taperfx.passes import fold_module
    from taperfx.quantize import quantize_module

    if gate_of(model) == 0.0:
        example = torch.zeros(1, 4, dtype=torch.long, device=next(model.parameters()).device)
        model = fold_module(model, (example,), guard_calls=False)[0]  # the decoder forward is the only path
    return quantize_module(model, quantize)[0]


def _checkpoint_target(path: Path, device: str, quantize=None) -> EvalTarget:
    model, meta = load_inference_model(path, device)
    if is_calibrated(model):
        set_gate(model, 0.0)
    gate = gate_of(model)
    if gate is None:  # no TaperNorm left: a baseline (None), or a folded checkpoint (the gate it was folded at)
        gate = meta.get("gate")
    if quantize is not None:
        model = _folded_quantized(model, quantize)
    return EvalTarget(
        lambda ids: model(ids)[0],
        int(model.output.out_features),  # reference decoders and HFCausalLM both name the projection `output`
        source_from_dict(meta["model"]).max_seq_len,
        trainer_windows(meta.get("train")),
        gate,
        next(model.buffers() if quantize is not None else model.parameters()).device,
        tokenizer_fingerprint(Path(meta["tokenizer_path"])) if "tokenizer_path" in meta else None,
    )


def _program_target(path: Path, device: str, quantize=None) -> EvalTarget:
    program, meta = load_program(path)
    decoder_layers(program)
    if quantize is not None:
        from taperfx.quantize import quantize_program

        program = quantize_program(program, quantize)[0]
    module = program.module().to(device)
    _, _, example_cache = program.example_inputs[0]
    empty = [tuple(t.new_zeros(1, t.shape[1], 0, t.shape[3]).to(device) for t in kv) for kv in example_cache]

    def forward(ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
        cache = [tuple(t.expand(ids.shape[0], -1, -1, -1) for t in kv) for kv in empty]
        return module(ids, positions, cache)[0]

    with torch.no_grad():
        vocab = int(forward(torch.zeros(1, 1, dtype=torch.long, device=device)).shape[-1])
    model_meta = meta.get("model") or {}
    return EvalTarget(
        forward,
        vocab,
        model_meta.get("max_seq_len"),
        trainer_windows(meta.get("train")),
        meta.get("gate"),
        torch.device(device),
        meta.get(TOKENIZER_KEY),  # absent from programs folded before fold recorded it: the data goes unchecked
    )


def _hf_target(path: Path, device: str, quantize=None) -> EvalTarget:
    from taperfx.hf import HFCausalLM, load_folded  # the optional hf extra, needed only for HF directories

    model = HFCausalLM(load_folded(path, dtype=torch.float32)).to(device).eval()
    if quantize is not None:
        model = _folded_quantized(model, quantize)
    return EvalTarget(
        lambda ids: model(ids)[0],
        int(model.output.out_features),
        model.max_seq_len,
        None,
        None,
        torch.device(device),
    )


def load_for_eval(path: str | os.PathLike, device: str = "cpu", quantize=None) -> EvalTarget:
    """What ``cross_entropy`` scores: a run, checkpoint, folded ``.pt2`` program or Hugging Face directory;
    with ``quantize`` (a ``taperfx.quantize`` config), folded and then quantized with it."""
    path = Path(path)
    if path.is_file():
        return _program_target(path, device, quantize)
    config_file = path / CONFIG_FILE
    if config_file.is_file() and "model_type" in read_json_object(config_file):
        return _hf_target(path, device, quantize)
    return _checkpoint_target(path, device, quantize)


def check_tokenizer(target: EvalTarget, data: PreparedData) -> bool:
    """Refuse data tokenized otherwise than the model was trained: its ids would be scored as other tokens (ids
    beyond the vocabulary are caught by ``cross_entropy``; these are not). False where the model records no
    tokenizer (a Hugging Face directory, a program folded before fold recorded it): nothing was checked."""
    if target.tokenizer is None:
        return False
    found = tokenizer_fingerprint(data.tokenizer_path)
    if found != target.tokenizer:
        raise DataError(
            f"{data.root} was tokenized with another tokenizer than the model's (vocabulary sha256 {found[:12]}, "
            f"the model's {target.tokenizer[:12]}); score it on data prepared with the model's tokenizer",
            code="tokenizer-mismatch",
        )
    return True


@torch.no_grad()
def cross_entropy(target: EvalTarget, stream: TokenStream, batch_size: int, n_batches: int) -> float:
    """Mean next-token cross-entropy (nats) of ``target`` over ``stream``'s evaluation windows."""
    total, count = 0.0, 0
    for x, y in stream.evaluation_batches(batch_size, n_batches):
        if int(x.max()) >= target.vocab_size:
            raise DataError(
                f"the data holds token id {int(x.max())} but the model's vocabulary has {target.vocab_size} "
                "entries: it was prepared with another tokenizer",
                code="vocab-mismatch",
            )
        logits = target.forward(x.to(target.device))
        total += float(F.cross_entropy(logits.float().flatten(0, 1), y.to(target.device).flatten(), reduction="sum"))
        count += y.numel()
    return total / count
