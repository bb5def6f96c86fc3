"""``taperfx demo``: the whole product, offline, on the embedded corpus, in minutes on a 2-core CPU.

corpus → tokenizer and token streams → a baseline and an Internal-Taper model
trained to g = 0 → fold (verified) → ONNX → a sample story from every backend →
a quick decode benchmark → a summary. Everything goes under ``--out``: the prepared
data is reused by a second run, the runs and artefacts are rewritten from scratch.
"""

from __future__ import annotations

import json
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

from taperfx.commands.outputs import check_output_dir
from taperfx.errors import BadInput, DataError

PROMPT = "Once upon a time"
STORY_TOKENS = 48


@contextmanager
def _stage(title: str):
    print(f"\n== {title}", flush=True)
    start = time.perf_counter()
    yield
    print(f"   done in {time.perf_counter() - start:.1f} s", flush=True)


def _train_config(data: Path, run_dir: Path, protocol: str, steps: int):
    """The demo's training config for ``protocol``, checked (values, schedule) before anything is written."""
    from taperfx.train import load_config

    return load_config(
        None,
        [
            f"data={json.dumps(str(data))}",
            f"out={json.dumps(str(run_dir))}",
            f"protocol='{protocol}'",
            f"steps={steps}",
            "model.preset='tinystories-64'",
            "model.n_layers=4",
            "model.max_seq_len=128",
            "batch_size=16",
            "lr=3e-3",
            f"eval_interval={max(steps // 4, 1)}",
            "eval_batches=8",
            f"checkpoint_interval={steps}",
            "log_interval=5",
            "keep_last=1",
        ],
    )


def _story(step, tokenizer) -> str:
    import torch

    from taperfx.models import generate

    prompt = torch.tensor([tokenizer.encode(PROMPT)])
    tokens = generate(step, prompt, STORY_TOKENS)[0].tolist()
    eos = tokenizer.eos_id()
    return tokenizer.decode(tokens[: tokens.index(eos)] if eos in tokens else tokens)


def run(args) -> int:
    out = check_output_dir(args.out, "--out")
    import sentencepiece as spm
    import torch

    import taperfx
    from taperfx.atomic import write_text
    from taperfx.benchmarks.decode import Case, run_decode_benchmark
    from taperfx.benchmarks.report import markdown_table, write_report
    from taperfx.commands.fold import describe, program_meta
    from taperfx.export import decoder_program, export_onnx
    from taperfx.export.ort_decoder import OnnxDecoder
    from taperfx.export.program import save_program
    from taperfx.train import load_model, prepare_data, read_meta, train
    from taperfx.train.plot import plot_runs

    # Every setting is checked before the first stage writes (a refused demo leaves no directory behind).
    if args.repeats < 1:
        raise BadInput(f"--repeats {args.repeats}: expected an integer >= 1", code="bad-repeats")
    protocols = ("baseline", "internal")
    configs = {p: _train_config(out / "data", out / "runs" / p, p, args.steps) for p in protocols}
    torch.manual_seed(0)

    with _stage("1/7 prepare the embedded synthetic corpus and a SentencePiece tokenizer"):
        prepare_data(out / "data", n_stories=args.stories)  # the vocabulary the corpus supports

    checkpoints = {}
    for i, protocol in enumerate(protocols):
        with _stage(f"{2 + i}/7 train {protocol} ({args.steps} steps)"):
            shutil.rmtree(configs[protocol].out, ignore_errors=True)
            checkpoints[protocol] = train(configs[protocol])
    val = {p: read_meta(c)["val_loss"] for p, c in checkpoints.items()}

    model, meta = load_model(checkpoints["internal"])
    if not meta["gate_zero"]:
        raise DataError(f"the Internal-Taper run ended at gate {meta['gate']}, not 0", code="not-gate-zero")
    with _stage("4/7 export, fold and verify"):
        program = decoder_program(model)
        folded, report = taperfx.fold_program(program)  # verified on the program's example inputs
        folded_path = save_program(folded, out / "internal-folded.pt2", program_meta(meta))
        print(describe(report))

    with _stage("5/7 export ONNX"):
        onnx_path = export_onnx(model, out / "onnx")

    tokenizer = spm.SentencePieceProcessor(model_file=meta["tokenizer_path"])
    stories = {}
    with _stage("6/7 generate a story with every backend"):
        backends = {
            "eager": model,
            "torch.compile(backend='taperfx')": torch.compile(model, backend="taperfx"),
            "ONNX Runtime": OnnxDecoder(onnx_path),
        }
        for name, step in backends.items():
            stories[name] = _story(step, tokenizer)
            print(f"   [{name}] {stories[name]}")

    with _stage("7/7 quick decode benchmark (random weights, the trained model's shape)"):
        bench = run_decode_benchmark(
            model.config, (Case(1, 64, 32),), ("eager", "onnxruntime"), repeats=args.repeats, progress=print
        )
        bench_paths = write_report(bench, out / "bench", "decode-demo")
    figures = plot_runs([out / "runs" / p for p in checkpoints], out / "figures").paths

    gap = (val["internal"] - val["baseline"]) / val["baseline"]
    summary = {
        "val_loss": val,
        "internal_vs_baseline": gap,
        "folded_norms": len(report.folded),
        "skipped_norms": [(s.name, s.reason) for s in report.skipped],
        "stories": stories,
        "artefacts": {
            "checkpoints": {p: str(c) for p, c in checkpoints.items()},
            "folded_program": str(folded_path),
            "onnx": str(onnx_path),
            "benchmark": [str(p) for p in bench_paths],
            "figures": [str(f) for f in figures],
        },
    }
    write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")

    print("\n== Summary")
    print(f"val loss: baseline {val['baseline']:.4f}, Internal-Taper at g = 0 {val['internal']:.4f} ({gap:+.2%})")
    print(
        f"fold: {len(report.folded)} norms folded, {len(report.skipped)} left "
        f"({', '.join(s.name for s in report.skipped)})"
    )
    print(markdown_table(bench))
    print("figures:\n" + "\n".join(f"  {f}" for f in figures))
    print(f"everything is under {out}/ (summary.json lists it)")
    return 0


def add_arguments(p) -> None:
    p.add_argument("--out", default="out/demo", help="output directory (a second run reuses its data)")
    p.add_argument("--steps", type=int, default=300, help="training steps per model")
    p.add_argument("--stories", type=int, default=12000, help="synthetic stories in the corpus")
    p.add_argument("--repeats", type=int, default=5, help="benchmark repeats")


def interrupted(args) -> str:
    return f"the prepared data in {args.out}/data is kept and reused by the next run; runs restart from scratch"
