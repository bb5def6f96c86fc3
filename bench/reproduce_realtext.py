"""Real-text reproduction of the paper's Table 1: baseline vs Internal-Taper vs All-Taper on public-domain prose.

The corpus (Jane Austen's novels by default; ``bench/realtext_corpus.py`` fetches it)
is prepared with ``taperfx data prepare``; every variant trains the same llama model
(depth 8, 16 heads) on the same data, token budget and schedule, once per seed.
Resumable: a finished run is kept, an interrupted one continues from its latest
checkpoint (bit for bit on CPU), so the grid can span several sittings; ``--report-only``
writes the report from whatever has finished. Variants:

- ``baseline``: RMSNorm everywhere, no scale loss;
- ``baseline+scale``: the baseline with the fixed-target scale loss on its final norm's input
  (separates anchoring the scale from removing the norms);
- ``internal``: Internal-Taper (final norm kept as the anchor) with the scale loss (the paper's "+aux");
- ``all``: All-Taper with the scale loss; ``internal-noaux``, ``all-noaux``: the tapered protocols with the
  scale loss off (``all-noaux`` shows logit chasing: nothing anchors the pre-logit scale).

Results (``bench/realtext_report.py``): ``bench/results/{name}.{json,md}`` and figures under
``bench/results/{name}/``, with a sample from each folded model through ``taperfx generate``.

    nice -n 15 python bench/reproduce_realtext.py --steps 1000 --seeds 0 1 2 --variants baseline internal
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from _runs import use_threads
from realtext_corpus import CorpusUnavailable, write_corpus
from realtext_report import finished, write_report

from taperfx.cli import main as taperfx_cli
from taperfx.train.checkpoint import list_checkpoints
from taperfx.train.config import load_config
from taperfx.train.loop import TrainingDiverged, train

VARIANT_OVERRIDES = {
    "baseline": ["protocol='baseline'", "scale_loss_weight=0"],
    "baseline+scale": ["protocol='baseline'", "scale_loss_on_baseline=true"],
    "internal": ["protocol='internal'"],
    "all": ["protocol='all'"],
    "internal-noaux": ["protocol='internal'", "scale_loss_weight=0"],
    "all-noaux": ["protocol='all'", "scale_loss_weight=0"],
}


def prepared_dir(work: Path, corpus_name: str, vocab_size: int) -> Path:
    return work / f"data-{corpus_name}-v{vocab_size}"


def prepare_corpus(work: Path, corpus: str, vocab_size: int, text: Path | None = None) -> Path:
    """The corpus as text (fetched once; ``text`` instead when given), then ``taperfx data prepare`` on it
    (which skips finished stages); returns the prepared directory."""
    try:
        text = text or write_corpus(corpus, work / "corpus" / f"{corpus}.txt")
    except CorpusUnavailable as exc:
        raise SystemExit(f"{Path(sys.argv[0]).name}: {exc}") from exc
    data = prepared_dir(work, Path(text).stem, vocab_size)
    if taperfx_cli(["data", "prepare", str(text), "--out", str(data), "--vocab-size", str(vocab_size)]) != 0:
        raise SystemExit(f"{Path(sys.argv[0]).name}: `taperfx data prepare` failed on {text}")
    return data


def run_overrides(args: argparse.Namespace, variant: str, seed: int) -> list[str]:
    """The training config of one run: the variant's protocol on the shared model, data and schedule."""
    return [
        f"model.preset='tinystories-{args.width}'",
        f"model.n_layers={args.depth}",
        f"steps={args.steps}",
        f"batch_size={args.batch_size}",
        f"context={args.context}",
        f"lr={args.lr}",
        f"seed={seed}",
        f"eval_interval={args.eval_interval}",
        f"eval_batches={args.eval_batches}",
        f"checkpoint_interval={args.checkpoint_interval}",
        "log_interval=10",
        "keep_last=1",
        "progress=false",
        *([] if args.calibration_steps is None else [f"calibration_steps={args.calibration_steps}"]),
        *VARIANT_OVERRIDES[variant],
    ]


def train_or_resume(data: Path, run: Path, overrides: list[str]) -> None:
    """Train ``run`` to the end: from scratch, or from its latest checkpoint; a divergence is recorded, not raised."""
    if finished(run):
        return
    config = load_config(None, [f"data={json.dumps(str(data))}", f"out={json.dumps(str(run))}", *overrides])
    resume = run.is_dir() and bool(list_checkpoints(run))
    print(f"{run.name}: {'resuming' if resume else 'starting'}", flush=True)
    try:
        train(config, resume=resume)
    except TrainingDiverged as exc:
        (run / "diverged.json").write_text(json.dumps({"diverged": str(exc)}) + "\n")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", choices=("austen", "kjv", "both"), default="austen")
    p.add_argument("--text", type=Path, help="use this one-document-per-line text instead of fetching a corpus")
    p.add_argument("--data", type=Path, help="an already prepared data directory (skips fetching and preparing)")
    p.add_argument("--variants", nargs="+", choices=list(VARIANT_OVERRIDES), default=["baseline", "internal"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--depth", type=int, default=8)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument(
        "--calibration-steps",
        type=int,
        help="explicit calibration window (default: the trainer's; needed under 300 steps)",
    )
    p.add_argument("--eval-interval", type=int, default=50)
    p.add_argument("--eval-batches", type=int, default=16)
    p.add_argument("--checkpoint-interval", type=int, default=100)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--samples", type=int, default=48, help="tokens sampled from each folded model; 0: none")
    p.add_argument("--report-only", action="store_true", help="write the report from the finished runs; train none")
    p.add_argument("--work", type=Path, default=Path("out/realtext"), help="corpus, data and runs (scratch)")
    p.add_argument("--results", type=Path, default=Path("bench/results"))
    p.add_argument("--name", help="results stem (default realtext_{corpus}_w{width})")
    args = p.parse_args(argv)
    use_threads(args.threads)
    if args.data is not None:
        data = args.data
    elif args.report_only:  # the data the runs were trained on, as it was prepared then
        data = prepared_dir(args.work, args.corpus if args.text is None else args.text.stem, args.vocab_size)
    else:
        data = prepare_corpus(args.work, args.corpus, args.vocab_size, args.text)
    name = args.name or f"realtext_{args.corpus if args.text is None else args.text.stem}_w{args.width}"
    runs = {(v, s): args.work / name / f"{v}-s{s}" for s in args.seeds for v in args.variants}
    if not args.report_only:
        for (variant, seed), run in runs.items():  # seed-major: every variant gets its first seed first
            train_or_resume(data, run, run_overrides(args, variant, seed))
    print(write_report(args, data, name, runs).read_text())


if __name__ == "__main__":
    main()
