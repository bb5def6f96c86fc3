"""``taperfx eval MODEL [--data DIR]``: mean held-out cross-entropy of a run, checkpoint, folded program or HF model.

Without flags a taperfx run, checkpoint or folded program is scored on the
trainer's own validation windows (its data, batch size, ``eval_batches`` and
context), so the result reproduces the run's ``val_loss``; each flag overrides one.
"""

from __future__ import annotations

import json

from taperfx.commands.devices import device_name, require_device
from taperfx.errors import BadInput, InputNotFound


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise ValueError(text)
    return value


def add_arguments(p) -> None:
    p.add_argument(
        "model", help="taperfx run or checkpoint directory, folded .pt2 program, or Hugging Face model directory"
    )
    p.add_argument("--data", help="prepared data directory, its val split is scored (default: the training data)")
    p.add_argument("--context", type=_positive, help="tokens per window (default: the trainer's, else the model's)")
    p.add_argument("--batch-size", type=_positive, help="windows per batch (default: the trainer's, else 8)")
    p.add_argument("--batches", type=_positive, help="number of batches (default: the trainer's eval_batches, else 20)")
    p.add_argument("--device", type=device_name, default="cpu", help="cpu, cuda or cuda:N")


def run(args) -> int:
    from taperfx.evaluate import cross_entropy, load_for_eval
    from taperfx.train.tokens import open_data

    require_device(args.device)
    target = load_for_eval(args.model, args.device)
    recorded = target.windows
    data = args.data or (recorded.data if recorded else None)
    if data is None:
        raise BadInput(f"{args.model} records no training data: pass --data DIR", code="no-data")
    context = args.context or (recorded.context if recorded else None) or target.max_seq_len
    if context is None:
        raise BadInput(f"{args.model} records no context length: pass --context N", code="no-context")
    if target.max_seq_len is not None and context > target.max_seq_len:
        raise BadInput(f"--context {context}: this model takes at most {target.max_seq_len} tokens", code="context")
    batch_size = args.batch_size or (recorded.batch_size if recorded else 8)
    batches = args.batches or (recorded.batches if recorded else 20)
    try:
        prepared = open_data(data)
    except InputNotFound as exc:
        raise InputNotFound(f"{exc} (scoring {args.model}; pass --data DIR)", code=exc.code) from exc
    result = {
        "model": str(args.model),
        "data": str(data),
        "cross_entropy": cross_entropy(target, prepared.stream("val", context), batch_size, batches),
        "tokens": batch_size * batches * context,
        "windows": {"batch_size": batch_size, "batches": batches, "context": context},
        "gate": target.gate,
    }
    print(json.dumps(result))
    return 0
