"""The ``taperfx`` command line. Each sub-command lives beside the code it drives.

A module listed in ``SUBCOMMANDS`` defines ``register(subparsers)``, which adds its
parser and sets ``func`` (called with the parsed namespace, returns an exit code).
Modules are imported only when listed, so ``taperfx --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = (
    "taperfx.demo",
    "taperfx.train.commands",
    "taperfx.benchmarks.cli",
    "taperfx.evaluate",
    "taperfx.hf.commands",
    "taperfx.passes.cli",
    "taperfx.export.cli_export",
    "taperfx.export.cli_generate",
)


def build_parser() -> argparse.ArgumentParser:
    from taperfx import __version__

    parser = argparse.ArgumentParser(
        prog="taperfx",
        description="Train normalization away (TaperNorm), fold it into the weights, ship a norm-free graph.",
    )
    parser.add_argument("--version", action="version", version=f"taperfx {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        # Expected failures (bad input, missing files) get one clear line, not a traceback.
        print(f"taperfx {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
