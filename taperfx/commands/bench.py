"""``taperfx bench decode``: the KV-cached decoding benchmark (baselines vs Internal-Taper unfused/fused)."""

from __future__ import annotations

from pathlib import Path

from taperfx.commands.outputs import check_output_dir
from taperfx.errors import BadInput

BACKENDS = ("compile", "compile-reduce-overhead", "eager", "onnxruntime")  # benchmarks.decode.BACKENDS, torch-free


def add_arguments(p) -> None:
    p.add_argument("--preset", default="tinystories-512", help="model preset (default: the paper's width-512 depth-8)")
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--max-seq-len", type=int, default=512)
    p.add_argument("--quick", action="store_true", help="a smaller grid that runs in a few minutes on a CPU")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    p.add_argument(
        "--backend", action="append", choices=BACKENDS, help="repeatable; default eager, compile, onnxruntime"
    )
    p.add_argument("--new-tokens", type=int, help="generated tokens per run (default: 128, quick: 32)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, help="torch and ONNX Runtime intra-op threads (default: torch's)")
    p.add_argument(
        "--quantize",
        action="append",
        metavar="SCHEME",
        help="repeatable: also time the folded model quantized (int4, int4:g64, int4:g128, int8)",
    )
    p.add_argument("--out", default="bench/results", help="directory for the JSON, markdown and PNG")
    p.add_argument("--stem", help="file name stem (default decode-DEVICE[-quick])")


def run(args) -> int:
    check_output_dir(args.out, "--out")
    if args.stem is not None and (Path(args.stem).name != args.stem or args.stem in (".", "..")):
        raise BadInput(f"--stem {args.stem}: expected a file name; the directory is --out", code="bad-stem")
    import torch

    from taperfx.benchmarks.decode import PAPER_GRID, QUICK_GRID, run_decode_benchmark
    from taperfx.benchmarks.report import markdown_table, write_report
    from taperfx.models import preset
    from taperfx.quantize import parse_scheme

    config = preset(args.preset, vocab_size=args.vocab_size, max_seq_len=args.max_seq_len)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise BadInput("--device cuda was asked for, but torch sees no CUDA device", code="no-cuda")
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
        quantize=tuple(parse_scheme(scheme) for scheme in args.quantize or ()),
        progress=print,
    )
    print(markdown_table(result))
    stem = args.stem or f"decode-{device}{'-quick' if args.quick else ''}"
    for path in write_report(result, args.out, stem):
        print(f"wrote {path}")
    return 0
