"""Quality of the quantization schemes on trained checkpoints, and what folding costs them.

For each scheme (int4 with group 32/64/128, int8) and on the same validation blocks as ``taperfx eval``:

- (a) ``folded``: the Internal-Taper model folded (s = c·γ̃ multiplied into each input column of the next
  linears), then quantized: what taperfx ships;
- (b) ``unfolded``: the same model at g = 0 with s kept as an explicit multiply, its (unfolded) linears
  quantized;
- (c) ``baseline``: the run trained with real RMSNorm, quantized;
- ONNX Runtime: (a) exported and quantized by ONNX Runtime's MatMulNBits (block = group size; int8 block 128);
- optionally a Hugging Face GPT-2-style directory written by ``taperfx export-hf`` (folded).

Each row gives the cross-entropy of the float model and of the quantized one, the relative change and the
top-1 agreement of the logits on the first evaluation batch. Comparing (a) with (b) isolates folding's share
of the quantization error.

Usage: ``python bench/quantize_quality.py --internal RUN --baseline RUN --data DATA [--hf DIR --hf-data DATA]``;
writes ``bench/results/quantize_quality.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

import taperfx
import taperfx.quantize as tq
from taperfx.benchmarks.decode import environment
from taperfx.evaluate import cross_entropy, load_for_eval
from taperfx.export.ort_decoder import OnnxDecoder
from taperfx.export.quantized import export_onnx_quantized
from taperfx.train.tokens import open_data

RESULTS = Path(__file__).parent / "results"
SCHEMES = ("int4:g32", "int4:g64", "int4:g128", "int8")
ONNX_SCHEMES = ("int4:g32", "int8")


@torch.no_grad()
def _step_cross_entropy(step, stream, batch_size: int, n_batches: int) -> float:
    """``cross_entropy`` for a decode step (ONNX Runtime) rather than a module."""
    total, count = 0.0, 0
    for x, y in stream.evaluation_batches(batch_size, n_batches):
        logits, _ = step(x, torch.arange(x.shape[1]).expand_as(x), None)
        total += float(F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum"))
        count += y.numel()
    return total / count


def _rows(label: str, model, stream, args, onnx: bool = False) -> list[dict]:
    x, _ = next(iter(stream.evaluation_batches(args.batch_size, 1)))
    before = cross_entropy(model, stream, args.batch_size, args.batches)
    rows = []
    for scheme in SCHEMES:
        quantized = tq.quantize(model, tq.parse_scheme(scheme))
        after = cross_entropy(quantized, stream, args.batch_size, args.batches)
        match = tq.agreement(model, quantized, x)
        rows.append(_row(label, "torch", scheme, before, after, match))
        print(rows[-1], flush=True)
    for scheme in ONNX_SCHEMES if onnx else ():
        with tempfile.TemporaryDirectory() as scratch:
            decoder = OnnxDecoder(export_onnx_quantized(model, scratch, tq.parse_scheme(scheme)))
            after = _step_cross_entropy(decoder, stream, args.batch_size, args.batches)
            match = tq.agreement(model, decoder, x)
        rows.append(_row(label, "onnxruntime", scheme, before, after, match))
        print(rows[-1], flush=True)
    return rows


def _row(label, backend, scheme, before, after, match) -> dict:
    return {
        "model": label,
        "backend": backend,
        "scheme": scheme,
        "cross_entropy_fp32": before,
        "cross_entropy_quantized": after,
        "change": (after - before) / before,
        "top1_agreement": match.top1,
        "logit_rms_error": match.rms_error,
    }


def _folded(model, stream, batch_size):
    x, _ = next(iter(stream.evaluation_batches(batch_size, 1)))
    folded, report = taperfx.fold_module(model, (x[:1],), guard_calls=False)
    if not report.folded:
        raise RuntimeError(f"nothing folded:\n{report}")
    return folded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--internal", required=True, help="Internal-Taper run (gate 0)")
    parser.add_argument("--baseline", required=True, help="baseline run (real RMSNorm), same data and settings")
    parser.add_argument("--data", required=True)
    parser.add_argument("--hf", help="a folded Hugging Face directory (taperfx export-hf)")
    parser.add_argument("--hf-data", help="its prepared data")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batches", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    load_before = os.getloadavg()[0]
    unfolded, context = load_for_eval(args.internal)
    stream = open_data(args.data).stream("val", context)
    rows = _rows("(a) Internal-Taper, folded", _folded(unfolded, stream, args.batch_size), stream, args, onnx=True)
    rows += _rows("(b) Internal-Taper, unfolded (s explicit)", unfolded, stream, args)
    baseline, _ = load_for_eval(args.baseline)
    rows += _rows("(c) baseline (real RMSNorm)", baseline, stream, args)
    if args.hf:
        hf, hf_context = load_for_eval(args.hf)
        rows += _rows(
            f"HF GPT-2-style, folded ({Path(args.hf).name})",
            hf,
            open_data(args.hf_data).stream("val", hf_context),
            args,
        )
    result = {
        "environment": environment(torch.device("cpu")),
        "runs": {"internal": args.internal, "baseline": args.baseline, "hf": args.hf},
        "tokens": args.batch_size * args.batches * context,
        "load": [load_before, os.getloadavg()[0]],
        "rows": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "quantize_quality.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# Quantization quality on trained checkpoints",
        "",
        f"Validation cross-entropy over {result['tokens']} tokens (the `taperfx eval` blocks); top-1 agreement "
        f"and logit rms error (relative to the logit rms) against the float model on the first batch. "
        f"torch {result['environment']['torch']}, onnxruntime {result['environment']['onnxruntime']}, "
        f"{result['environment']['date']}.",
        "",
        "| model | backend | scheme | CE fp32 | CE quantized | change | top-1 agreement | logit rms error |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['backend']} | {r['scheme']} | {r['cross_entropy_fp32']:.4f} | "
            f"{r['cross_entropy_quantized']:.4f} | {r['change']:+.2%} | {r['top1_agreement']:.2%} | "
            f"{r['logit_rms_error']:.3f} |"
        )
    (RESULTS / "quantize_quality.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
