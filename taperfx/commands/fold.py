"""``taperfx fold CHECKPOINT -o OUT.pt2``: checkpoint → export → fold → verify → ``torch.export.save``.

The one place that glues the stages together, outside the compiler package, so
that ``taperfx.passes`` never depends on training or export code.
"""

from __future__ import annotations

from taperfx.commands.outputs import check_output_file
from taperfx.errors import BadInput, DataError


def size(n_bytes: int) -> str:
    """``n_bytes`` with a unit that keeps it readable (B, KiB, MiB, GiB)."""
    value = float(n_bytes)
    for unit in ("B", "KiB", "MiB"):
        if abs(value) < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    return f"{value:.2f} GiB"


def add_arguments(p) -> None:
    p.add_argument("checkpoint", help="checkpoint directory (or a run directory: its latest checkpoint)")
    p.add_argument("-o", "--out", required=True, help="output file for torch.export.save (.pt2)")
    p.add_argument("--strict", action="store_true", help="fail if any norm cannot be folded")
    p.add_argument("--untie-shared", action="store_true", help="fold into a copy of weights shared with other layers")
    p.add_argument("--no-verify", action="store_true", help="skip comparing the folded program with the original")


def describe(report, verification) -> str:
    """The fold report for people: norms, parameters and memory with units, and the verification's verdict."""
    delta = report.bytes_after - report.bytes_before
    memory = f"saves {size(-delta)}" if delta <= 0 else f"adds {size(delta)}: untied copies"
    lines = [
        f"folded {len(report.folded)} norm(s), kept {len(report.skipped)}; "
        f"parameter tensors: {len(report.params_added)} added, {len(report.params_removed)} removed; "
        f"weights {size(report.bytes_before)} -> {size(report.bytes_after)} ({memory}); "
        f"{report.seconds * 1e3:.0f} ms"
    ]
    lines += [f"  folded  {f.name} ({f.kind}) -> {', '.join(f.weights)}" for f in report.folded]
    lines += [f"  kept    {s.name}: {s.reason}" for s in report.skipped]
    if report.params_added:
        lines.append(f"  added   {', '.join(report.params_added)}")
    if verification is None:
        lines.append("verification: skipped (--no-verify)")
    else:
        worst = max(verification.outputs, key=lambda e: e.max_rel)
        lines.append(
            f"verification: passed, {len(verification.outputs)} output(s) match the unfolded program "
            f"(max relative error {worst.max_rel:.2g})"
        )
    return "\n".join(lines)


def program_meta(meta: dict) -> dict:
    """What a folded program keeps of its checkpoint: enough for ``taperfx eval`` to use the trainer's windows."""
    keys = ("model", "protocol", "step", "gate", "val_loss", "train")
    return {**{k: meta.get(k) for k in keys}, "checkpoint": meta["path"]}


def run(args) -> int:
    out = check_output_file(args.out)
    from taperfx.export.program import decoder_program, save_program
    from taperfx.passes import FoldError, fold_program, verify
    from taperfx.train.checkpoint import load_model

    model, meta = load_model(args.checkpoint)
    program = decoder_program(model)
    try:
        folded, report = fold_program(program, strict=args.strict, untie_shared=args.untie_shared)
    except FoldError as exc:
        raise BadInput(f"{args.checkpoint}: {exc}", code="fold-strict") from exc
    verification = None
    if not args.no_verify:
        verification = verify(program, folded, *program.example_inputs)
        if not verification.ok:
            raise DataError(
                f"the folded program does not match the original, nothing written:\n{verification}",
                code="fold-mismatch",
            )
    save_program(folded, out, program_meta(meta))
    print(describe(report, verification))
    print(f"wrote {out}")
    return 0
