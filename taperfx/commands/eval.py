"""``taperfx eval MODEL [--data DIR]``: mean held-out cross-entropy of a run, checkpoint, folded program or HF model.

Without flags a taperfx run, checkpoint or folded program is scored on the
trainer's own validation windows (its data, batch size, ``eval_batches`` and
context), so the result reproduces the run's ``val_loss``; each flag overrides one.
"""

from __future__ import annotations

import argparse
import json

from taperfx.commands.devices import device_name, require_device
from taperfx.errors import BadInput, InputNotFound
from taperfx.quantize.arguments import add_quantize_argument, quantize_config


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def add_arguments(p) -> None:
    p.add_argument(
        "model",
        help="taperfx run or checkpoint directory (folded or not), folded .pt2 program, or Hugging Face model dir",
    )
    p.add_argument("--data", help="prepared data directory, its val split is scored (default: the training data)")
    p.add_argument("--context", type=_positive, help="tokens per window (default: the trainer's, else the model's)")
    p.add_argument("--batch-size", type=_positive, help="windows per batch (default: the trainer's, else 8)")
    p.add_argument("--batches", type=_positive, help="number of batches (default: the trainer's eval_batches, else 20)")
    p.add_argument("--device", type=device_name, default="cpu", help="cpu, cuda or cuda:N")
    add_quantize_argument(p)


def _quantized(args, target, config, stream, batch_size: int, batches: int, before: float) -> dict:
    """The same windows scored after fold and ``config``'s quantization, and the logits' agreement with the
    unquantized model on the first batch."""
    from taperfx.evaluate import cross_entropy, load_for_eval
    from taperfx.quantize import agreement

    quantized = load_for_eval(args.model, args.device, quantize=config)
    after = cross_entropy(quantized, stream, batch_size, batches)
    x = next(iter(stream.evaluation_batches(batch_size, 1)))[0].to(target.device)
    match = agreement(*(lambda ids, positions, past, t=t: (t.forward(ids), None) for t in (target, quantized)), x)
    return {
        "quantize": config.name,
        "cross_entropy_quantized": after,
        "cross_entropy_change": (after - before) / before,
        "top1_agreement": match.top1,
        "logit_rms_error": match.rms_error,
    }


def run(args) -> int:
    from taperfx.evaluate import check_tokenizer, cross_entropy, load_for_eval
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
    tokenizer_checked = check_tokenizer(target, prepared)
    config = quantize_config(args)
    stream = prepared.stream("val", context)
    if (args.batch_size or args.batches) and batch_size * batches > stream.n_windows:
        raise BadInput(
            f"--batch-size {batch_size} x --batches {batches} windows: the held-out split of {data} holds only "
            f"{stream.n_windows} distinct windows of {context} tokens",
            code="too-many-windows",
        )
    result = {
        "model": str(args.model),
        "data": str(data),
        "cross_entropy": cross_entropy(target, stream, batch_size, batches),
        "tokens": batch_size * batches * context,
        "windows": {"batch_size": batch_size, "batches": batches, "context": context},
        "gate": target.gate,
        "tokenizer_checked": tokenizer_checked,
    }
    if config is not None:
        result.update(_quantized(args, target, config, stream, batch_size, batches, result["cross_entropy"]))
    print(json.dumps(result))
    return 0
