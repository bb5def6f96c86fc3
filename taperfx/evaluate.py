"""``taperfx eval``: mean cross-entropy on held-out token blocks, for any checkpoint.

This is the number the paper's Table 3 reports, computed one way for every kind of
model so that a vanilla and a tapered one are compared by one command: a taperfx
checkpoint (or run directory), or a Hugging Face directory (plain, or folded by
``taperfx export-hf``). Blocks are the data's ``val`` split cut into
``batches × batch_size`` evenly spaced windows, the same ones on every call.

Tapered checkpoints whose norms are calibrated are evaluated at g = 0 (docs/method.md §5),
as the trainer's ``val_loss`` is.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from taperfx.convert import gate_of, is_calibrated, set_gate
from taperfx.models import source_from_dict
from taperfx.train.checkpoint import CONFIG_FILE, load_model
from taperfx.train.tokens import TokenStream, open_data

__all__ = ["cross_entropy", "load_for_eval"]


def load_for_eval(path: str | os.PathLike, device: str = "cpu") -> tuple[nn.Module, int]:
    """``(model, max_seq_len)`` in eval mode; the model follows the reference decoders' calling convention."""
    path = Path(path)
    config_file = path / CONFIG_FILE
    if config_file.is_file() and "model_type" in json.loads(config_file.read_text()):
        from taperfx.hf import HFCausalLM, load_folded  # the optional hf extra, needed only for HF directories

        hf = load_folded(path, dtype=torch.float32)
        model = HFCausalLM(hf).to(device).eval()
        return model, model.max_seq_len
    model, meta = load_model(path, device)
    if is_calibrated(model):
        set_gate(model, 0.0)
    return model, source_from_dict(meta["model"]).max_seq_len


@torch.no_grad()
def cross_entropy(model: nn.Module, stream: TokenStream, batch_size: int, n_batches: int) -> float:
    """Mean next-token cross-entropy (nats) of ``model`` over ``stream``'s evaluation blocks."""
    device = next(model.parameters()).device
    vocab = model.output.weight.shape[0]  # reference decoders and HFCausalLM both name the projection `output`
    total, count = 0.0, 0
    for x, y in stream.evaluation_batches(batch_size, n_batches):
        if int(x.max()) >= vocab:
            raise ValueError(f"the data holds token id {int(x.max())} but the model's vocabulary has {vocab} entries")
        logits, _ = model(x.to(device))
        total += float(F.cross_entropy(logits.float().flatten(0, 1), y.to(device).flatten(), reduction="sum"))
        count += y.numel()
    return total / count


def _eval(args) -> int:
    model, max_seq_len = load_for_eval(args.checkpoint, args.device)
    context = args.context or max_seq_len
    if not 0 < context <= max_seq_len:
        raise ValueError(f"--context must lie in [1, {max_seq_len}] for this model, got {context}")
    stream = open_data(args.data).stream("val", context)
    result = {
        "checkpoint": str(args.checkpoint),
        "data": str(args.data),
        "cross_entropy": cross_entropy(model, stream, args.batch_size, args.batches),
        "tokens": args.batch_size * args.batches * context,
        "gate": gate_of(model),
    }
    print(json.dumps(result))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="mean cross-entropy on held-out token blocks (taperfx or Hugging Face checkpoint)")
    p.add_argument("checkpoint", help="taperfx checkpoint or run directory, or a Hugging Face model directory")
    p.add_argument("--data", required=True, help="prepared data directory (its val split is used)")
    p.add_argument("--context", type=int, help="tokens per block (default: the model's maximum)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=_eval)
