"""Quantized KV-cached decoding beside fp32, and every configuration tried and rejected, with its measured reason.

Three parts, each interleaving its variants round by round and recording the load:

1. ``taperfx bench decode`` rows: the paper's width-512 depth-8 model (random weights: speed does not
   depend on their values), batch 1, prompt 128, 32 new tokens, one thread; fp32 baseline and folded
   Internal-Taper, and the folded model quantized (int4 group 32 and 128, int8) on eager, torch.compile
   and ONNX Runtime (quantized by ONNX Runtime's MatMulNBits).
2. Linear kernels at the model's shapes (the 32000x512 head, the 1368x512 and 512x1368 MLP): fp32
   ``F.linear``, the shipped ATen kernels with bfloat16 activations, the same kernels with fp32
   activations, torchao 0.18's CPU configs.
3. ONNX Runtime alternatives: 4-bit without the head untied (it stays fp32), 4-bit and 8-bit at the
   default accuracy level (fp32 compute), 8-bit at accuracy level 4.

Usage: ``python bench/quantize_decode.py [--repeats 5] [--new-tokens 32]``; writes
``bench/results/quantize_decode.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import taperfx.quantize as tq
from taperfx.benchmarks.decode import Case, environment, quantized_variant, run_decode_benchmark
from taperfx.benchmarks.report import markdown_table
from taperfx.benchmarks.variants import build_variants
from taperfx.export.ort_decoder import OnnxDecoder
from taperfx.export.quantized import export_onnx_quantized
from taperfx.models import preset, stream
from taperfx.quantize import _compat, ops

RESULTS = Path(__file__).parent / "results"
SCHEMES = (tq.Int4WeightOnly(group_size=32), tq.Int4WeightOnly(group_size=128), tq.Int8WeightOnly())
SHAPES = {"head 32000x512": (32000, 512), "mlp w1 1368x512": (1368, 512), "mlp w2 512x1368": (512, 1368)}


def _interleaved(candidates: dict, repeats: int, inner: int) -> dict:
    """Median and range of seconds per call for each candidate, rounds interleaved; load recorded per round."""
    times, loads = {k: [] for k in candidates}, []
    for fn in candidates.values():
        fn()
    for r in range(repeats):
        names = list(candidates)
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start = time.perf_counter()
            for _ in range(inner):
                candidates[name]()
            times[name].append((time.perf_counter() - start) / inner)
        loads.append(os.getloadavg()[0])
    return {k: {"median_s": statistics.median(v), "min_s": min(v), "max_s": max(v)} for k, v in times.items()} | {
        "_load": loads
    }


def _torchao_linear(weight: torch.Tensor, config):
    from torchao.quantization import quantize_

    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    linear.weight.data.copy_(weight)
    quantize_(linear, config)
    return linear


def kernel_rows(repeats: int) -> dict:
    """Part 2: one linear at batch 1 for every candidate kernel; a refused configuration records its error."""
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig

    out = {}
    for label, (n, k) in SHAPES.items():
        weight, x = torch.randn(n, k) * 0.02, torch.randn(1, k)
        int4, int8 = ops.pack_int4(weight, 32), ops.pack_int8(weight)
        candidates = {
            "fp32 F.linear": lambda: F.linear(x, weight),
            "int4 g32 ATen, bf16 activations (shipped)": lambda: ops.linear_int4(
                x, int4.packed, int4.scales_zeros, None, 32, n
            ),
            "int8 ATen, bf16 activations (shipped)": lambda: ops.linear_int8(x, int8.codes, int8.scales, None),
        }
        if k % 32 == 0 and n % 16 == 0:
            sz = int4.scales_zeros.float()
            candidates["int4 g32 ATen, fp32 activations"] = lambda: _compat.int4_mm_cpu(x, int4.packed, 32, sz)
        scales32 = int8.scales.float()
        if k % 8 == 0:
            candidates["int8 ATen, fp32 activations"] = lambda: _compat.int8_mm_cpu(x, int8.codes, scales32)
        refused = {}
        for name, config in (
            ("torchao Int8WeightOnlyConfig", Int8WeightOnlyConfig()),
            ("torchao Int4WeightOnlyConfig", Int4WeightOnlyConfig(group_size=32)),
        ):
            try:
                linear = _torchao_linear(weight, config)
                with torch.no_grad():
                    linear(x)
                candidates[name] = lambda linear=linear: linear(x)
            except Exception as exc:  # noqa: BLE001 - a refusal is a measured result here
                refused[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
        with torch.no_grad():
            timed = _interleaved(candidates, repeats, inner=20)
        out[label] = {"timings": timed, "refused": refused, "weight_bytes_fp32": 4 * n * k}
    return out


def _ort_decode_rate(decoder, ids, new_tokens: int) -> float:
    start = None
    for i, _ in enumerate(stream(decoder, ids, new_tokens)):
        if i == 0:
            start = time.perf_counter()
    return (new_tokens - 1) / (time.perf_counter() - start)


def ort_alternatives(model, repeats: int, new_tokens: int) -> dict:
    """Part 3: decode tokens/s of ONNX Runtime configurations, interleaved (the shipped one included)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    configs = {
        "int4 g32, head untied, accuracy 4 (shipped)": (tq.Int4WeightOnly(), {}),
        "int4 g32, head left fp32 (tied), accuracy 4": (tq.Int4WeightOnly(), {"untie_head": False}),
        "int4 g32, head untied, default accuracy": (tq.Int4WeightOnly(), {"accuracy_level": None}),
        "int8 block 128, accuracy 4 (shipped)": (tq.Int8WeightOnly(), {}),
        "int8 block 128, default accuracy": (tq.Int8WeightOnly(), {"accuracy_level": None}),
    }
    decoders, sizes = {}, {}
    with tempfile.TemporaryDirectory() as scratch:
        for i, (name, (config, options_)) in enumerate(configs.items()):
            path = export_onnx_quantized(model, Path(scratch) / str(i), config, **options_)
            sizes[name] = path.stat().st_size
            decoders[name] = OnnxDecoder(path, options=options)
        ids = torch.randint(0, model.config.vocab_size, (1, 128), generator=torch.Generator().manual_seed(0))
        rates, loads = {k: [] for k in decoders}, []
        for name in decoders:
            _ort_decode_rate(decoders[name], ids, 4)
        for r in range(repeats):
            names = list(decoders)
            for name in names[r % len(names) :] + names[: r % len(names)]:
                rates[name].append(_ort_decode_rate(decoders[name], ids, new_tokens))
            loads.append(os.getloadavg()[0])
    return {
        name: {"tokens_per_s": statistics.median(v), "min": min(v), "max": max(v), "onnx_bytes": sizes[name]}
        for name, v in rates.items()
    } | {"_load": loads}


def _markdown(result: dict) -> str:
    env = result["environment"]
    lines = [
        "# Quantized decoding on CPU",
        "",
        f"{env['cpu']}, torch {env['torch']}, onnxruntime {env['onnxruntime']}, torchao {result['torchao']}, "
        f"{env['threads']} thread(s), {env['date']}. Load average (1 min) during the runs: "
        f"{min(result['loads']):.1f}–{max(result['loads']):.1f} on {os.cpu_count()} cores (shared machine).",
        "",
    ]
    if "decode" in result:
        lines += [
            "## 1. Decode (width 512, depth 8, vocab 32000, batch 1, prompt 128)",
            "",
            markdown_table(result["decode"]),
        ]
    if "kernels" in result:
        lines += [
            "## 2. Linear kernels at batch 1 (median µs per call, min–max; interleaved)",
            "",
            "| shape | kernel | µs | × fp32 |",
            "|---|---|---|---|",
        ]
    for shape, row in result.get("kernels", {}).items():
        fp32 = row["timings"]["fp32 F.linear"]["median_s"]
        for name, t in row["timings"].items():
            if name.startswith("_"):
                continue
            lines.append(
                f"| {shape} | {name} | {1e6 * t['median_s']:.0f} ({1e6 * t['min_s']:.0f}–{1e6 * t['max_s']:.0f}) "
                f"| {fp32 / t['median_s']:.2f} |"
            )
        for name, reason in row["refused"].items():
            lines.append(f"| {shape} | {name} | refused: {reason} | – |")
    if "ort_alternatives" in result:
        lines += ["", "## 3. ONNX Runtime configurations (decode tokens/s, median, min–max)", ""]
        lines += ["| configuration | tokens/s | model.onnx MiB |", "|---|---|---|"]
    for name, row in result.get("ort_alternatives", {}).items():
        if not name.startswith("_"):
            lines.append(
                f"| {name} | {row['tokens_per_s']:.1f} ({row['min']:.1f}–{row['max']:.1f}) "
                f"| {row['onnx_bytes'] / 2**20:.1f} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--skip", action="append", default=[], choices=("decode", "kernels", "ort"))
    parser.add_argument(
        "--name",
        default="quantize_decode",
        help="results name under bench/results/; a run with --skip needs its own (it holds only some parts)",
    )
    args = parser.parse_args()
    if args.skip and args.name == "quantize_decode":
        parser.error("--skip writes only some parts: give it its own --name, so the full results are not replaced")
    torch.set_num_threads(1)
    import torchao

    config = preset("tinystories-512")
    result = {"environment": environment(torch.device("cpu")), "torchao": torchao.__version__, "loads": []}
    if "decode" not in args.skip:
        result["decode"] = run_decode_benchmark(
            config,
            (Case(1, 128, args.new_tokens),),
            ("eager", "compile", "onnxruntime"),
            repeats=args.repeats,
            variants=("baseline-fused", "taper-fused"),
            threads=1,
            quantize=SCHEMES,
            progress=print,
        )
        result["loads"].append(os.getloadavg()[0])
        result["decode_variants"] = [quantized_variant(q) for q in SCHEMES]
    if "kernels" not in args.skip:
        result["kernels"] = kernel_rows(args.repeats)
        result["loads"] += [x for row in result["kernels"].values() for x in row["timings"]["_load"]]
        print(json.dumps({k: v["refused"] for k, v in result["kernels"].items()}))
    if "ort" not in args.skip:
        model = build_variants(config, torch.device("cpu"), torch.float32)["taper-fused"]
        result["ort_alternatives"] = ort_alternatives(model, args.repeats, args.new_tokens)
        result["loads"] += result["ort_alternatives"]["_load"]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"{args.name}.md").write_text(_markdown(result))
    print(f"wrote {RESULTS / args.name}.json and .md")


if __name__ == "__main__":
    main()
