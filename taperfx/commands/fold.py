"""``taperfx fold CHECKPOINT -o OUT.pt2``: checkpoint → export → fold → verify → ``torch.export.save``.

``-o DIR`` (any path not ending in ``.pt2``) or ``--in-place`` fold the checkpoint's
shards on disk instead, streamed, for models of any size
(``taperfx.checkpoint_fold.fold_checkpoint``).

The one place that glues the stages together, outside the compiler package, so
that ``taperfx.passes`` never depends on training or export code.
"""

from __future__ import annotations

from pathlib import Path

from taperfx.commands.outputs import check_output_dir, check_output_file
from taperfx.errors import BadInput, DataError, InputNotFound, TaperfxError, WouldOverwrite
from taperfx.quantize.arguments import add_quantize_argument, quantize_config


def size(n_bytes: int) -> str:
    """``n_bytes`` with a unit that keeps it readable (B, KiB, MiB, GiB)."""
    value = float(n_bytes)
    for unit in ("B", "KiB", "MiB"):
        if abs(value) < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    return f"{value:.2f} GiB"


def add_arguments(p) -> None:
    p.add_argument(
        "checkpoint",
        help="checkpoint directory (or a run directory: its latest checkpoint), or a transformers directory",
    )
    p.add_argument(
        "-o",
        "--out",
        help="OUT.pt2: the folded program (torch.export.save); any other path: a new directory for the folded "
        "checkpoint, streamed shard by shard (any model size)",
    )
    p.add_argument(
        "--in-place",
        action="store_true",
        help="fold the checkpoint's shards where they are (crash-safe: after a crash, run it again to finish)",
    )
    p.add_argument("--strict", action="store_true", help="fail if any norm cannot be folded")
    p.add_argument("--untie-shared", action="store_true", help="fold into a copy of weights shared with other layers")
    p.add_argument("--no-verify", action="store_true", help="skip comparing the folded program with the original")
    add_quantize_argument(p)


def describe(report) -> str:
    """The fold report for people: norms, parameters and memory with units, and what was checked."""
    delta = report.bytes_after - report.bytes_before
    memory = f"saves {size(-delta)}" if delta <= 0 else f"adds {size(delta)}: untied copies"
    lines = [
        f"folded {len(report.folded)} norm(s), kept {len(report.skipped)}; "
        f"parameter tensors: {len(report.params_added)} added, {len(report.params_removed)} removed; "
        f"weights {size(report.bytes_before)} -> {size(report.bytes_after)} ({memory}); "
        f"{report.seconds * 1e3:.0f} ms"
    ]
    lines += [f"  folded  {f.name} ({f.kind}) -> {', '.join(f.weights)}" for f in report.folded]
    lines += [f"  kept    {s}" for s in report.skipped]
    if report.params_added:
        lines.append(f"  added   {', '.join(report.params_added)}")
    verdict = "passed" if report.verified else "not run (--no-verify, or nothing was folded)"
    lines.append(f"verification: {verdict}; {report.summary_of_checks()}")
    return "\n".join(lines)


def program_meta(meta: dict) -> dict:
    """What a folded program keeps of its checkpoint: enough for ``taperfx eval`` to use the trainer's windows
    and to refuse data of another tokenizer."""
    from taperfx.export.program import TOKENIZER_KEY
    from taperfx.train.tokens import tokenizer_fingerprint

    keys = ("model", "protocol", "step", "gate", "val_loss", "train")
    tokenizer = tokenizer_fingerprint(Path(meta["tokenizer_path"]))
    return {**{k: meta.get(k) for k in keys}, "checkpoint": meta["path"], TOKENIZER_KEY: tokenizer}


def _refuse_output_in_source(source: str, out: Path) -> None:
    """A folded copy written inside the checkpoint would become part of it; written in its run's checkpoints/
    directory, the run would take it for one of its own (``--resume``, ``fold RUN`` and ``eval RUN`` would read it)."""
    from taperfx.train.checkpoint import CHECKPOINTS_DIR, resolve_checkpoint

    if not Path(source).exists():
        return  # the fold names the missing source
    ckpt = resolve_checkpoint(source).resolve()
    inside = ckpt.parent if ckpt.parent.name == CHECKPOINTS_DIR else ckpt
    if out.resolve().is_relative_to(inside):
        raise WouldOverwrite(
            f"-o {out} lies inside {inside}, which holds the checkpoint being folded; choose a directory outside it",
            code="output-inside-input",
        )


def run_streamed(args) -> int:
    """``-o DIR`` / ``--in-place``: the streamed fold of the checkpoint on disk."""
    if args.in_place == (args.out is not None):
        raise BadInput("give either -o DIR or --in-place", code="fold-output")
    if args.strict or args.untie_shared or args.no_verify:
        raise BadInput(
            "--strict, --untie-shared and --no-verify apply to a .pt2 output; the streamed fold unties shared "
            "weights and always spot-checks what it writes",
            code="fold-option",
        )
    out = None if args.in_place else check_output_dir(args.out, new=True)
    if out is not None:
        _refuse_output_in_source(args.checkpoint, out)
    from taperfx.checkpoint_fold import fold_checkpoint

    try:
        result = fold_checkpoint(args.checkpoint, out, in_place=args.in_place)
    except TaperfxError:  # already coded (a folded input, a damaged file)
        raise
    except FileNotFoundError as exc:
        raise InputNotFound(str(exc), code="fold-input") from exc
    except ValueError as exc:
        raise BadInput(f"{args.checkpoint}: {exc}", code="fold-checkpoint") from exc
    print(result)
    return 0


def run(args) -> int:
    config = quantize_config(args)
    if args.in_place or (args.out is not None and not args.out.endswith(".pt2")):
        if config is not None:
            raise BadInput("--quantize applies to a .pt2 output (-o OUT.pt2)", code="quantize-needs-program")
        return run_streamed(args)
    if args.out is None:
        raise BadInput("give -o OUT.pt2, -o DIR or --in-place", code="fold-output")
    out = check_output_file(args.out)
    from taperfx.export.onnx_export import weights_fingerprint
    from taperfx.export.program import decoder_program, save_program
    from taperfx.passes import FoldError, fold_program
    from taperfx.passes.reasons import SkipReason
    from taperfx.train.checkpoint import load_model

    model, meta = load_model(args.checkpoint)
    recorded = program_meta(meta)  # a damaged tokenizer is named before the fold's work
    program = decoder_program(model)
    try:
        folded, report = fold_program(
            program, strict=args.strict, untie_shared=args.untie_shared, verify=not args.no_verify
        )
    except FoldError as exc:  # a refusal under --strict is the user's choice; drifting outputs are the data's
        failure = DataError if exc.code == SkipReason.VERIFY_FAILED else BadInput
        raise failure(f"{args.checkpoint}: {exc} (nothing written)", code=str(exc.code)) from exc
    print(describe(report))
    if config is not None:
        from taperfx.export.quantized import quantize_folded_program

        c = model.config
        folded = quantize_folded_program(folded, config, c.vocab_size, c.max_seq_len)
    quantize = None if config is None else config.name
    save_program(folded, out, {**recorded, "quantize": quantize, "weights_sha256": weights_fingerprint(model)})
    print(f"wrote {out}")
    return 0
