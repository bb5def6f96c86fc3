"""``taperfx fold CHECKPOINT -o OUT.pt2``: checkpoint → export → fold → ``torch.export.save``.

The one place that glues the stages together; it imports them lazily so that
``taperfx.passes`` itself never depends on training or export code.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def run(args) -> int:
    import torch

    from taperfx.export.program import decoder_program
    from taperfx.passes.program import fold_program
    from taperfx.quantize.arguments import quantize_config
    from taperfx.train.checkpoint import load_model

    config = quantize_config(args)
    model, _ = load_model(args.checkpoint)
    program, report = fold_program(
        decoder_program(model), strict=args.strict, untie_shared=args.untie_shared, verify=not args.no_verify
    )
    if config is not None:
        from taperfx.export.quantized import quantize_folded_program

        program = quantize_folded_program(program, config, model.config.vocab_size, model.config.max_seq_len)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.export.save(program, tmp)
        os.replace(tmp, out)  # atomic: a crash leaves the old file or none, never half of one
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    print(report)
    print(f"wrote {out}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("fold", help="fold a gate-zero checkpoint's norms into its weights and save the program")
    p.add_argument("checkpoint", help="checkpoint directory (or a run directory: its latest checkpoint)")
    p.add_argument("-o", "--out", required=True, help="output file for torch.export.save (.pt2)")
    p.add_argument("--strict", action="store_true", help="fail if any norm cannot be folded")
    p.add_argument("--untie-shared", action="store_true", help="fold into a copy of weights shared with other layers")
    p.add_argument("--no-verify", action="store_true", help="skip comparing the folded program with the original")
    from taperfx.quantize.arguments import add_quantize_argument

    add_quantize_argument(p)
    p.set_defaults(func=run)
