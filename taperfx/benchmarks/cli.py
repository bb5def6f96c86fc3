"""``taperfx bench decode``: the KV-cached decoding benchmark from the command line."""

from __future__ import annotations

import torch

from taperfx.benchmarks.decode import BACKENDS, PAPER_GRID, QUICK_GRID, run_decode_benchmark
from taperfx.benchmarks.report import markdown_table, write_report
from taperfx.models import preset
from taperfx.quantize import parse_scheme


def run(args) -> int:
    config = preset(args.preset, vocab_size=args.vocab_size, max_seq_len=args.max_seq_len)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for, but torch sees no CUDA device")
    grid = QUICK_GRID if args.quick else PAPER_GRID
    if args.new_tokens:
        grid = tuple(type(c)(c.batch, c.prompt, args.new_tokens) for c in grid)
    backends = tuple(args.backend or ("eager", "compile", "onnxruntime"))
    result = run_decode_benchmark(
        config,
        grid,
        backends,
        device=device,
        repeats=args.repeats,
        warmup=args.warmup,
        threads=args.threads,
        quantize=tuple(parse_scheme(s) for s in args.quantize or ()),
        progress=print,
    )
    print(markdown_table(result))
    stem = args.stem or f"decode-{device}{'-quick' if args.quick else ''}"
    for path in write_report(result, args.out, stem):
        print(f"wrote {path}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks")
    bench = p.add_subparsers(dest="bench", metavar="BENCHMARK", required=True)
    d = bench.add_parser("decode", help="KV-cached decoding throughput: baselines vs Internal-Taper unfused/fused")
    d.add_argument("--preset", default="tinystories-512", help="model preset (default: the paper's width-512 depth-8)")
    d.add_argument("--vocab-size", type=int, default=32000)
    d.add_argument("--max-seq-len", type=int, default=512)
    d.add_argument("--quick", action="store_true", help="a smaller grid that runs in a few minutes on a CPU")
    d.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    d.add_argument(
        "--backend", action="append", choices=sorted(BACKENDS), help="repeatable; default eager, compile, onnxruntime"
    )
    d.add_argument("--new-tokens", type=int, help="generated tokens per run (default: 128, quick: 32)")
    d.add_argument("--repeats", type=int, default=5)
    d.add_argument("--warmup", type=int, default=1)
    d.add_argument("--threads", type=int, help="torch and ONNX Runtime intra-op threads (default: torch's)")
    d.add_argument(
        "--quantize",
        action="append",
        metavar="SCHEME",
        help="repeatable: also time the folded model quantized (int4, int4:g64, int4:g128, int8)",
    )
    d.add_argument("--out", default="bench/results", help="directory for the JSON, markdown and PNG")
    d.add_argument("--stem", help="file name stem (default decode-DEVICE[-quick])")
    d.set_defaults(func=run)
