"""The ``--quantize`` option every command shares: wiring a command is two lines,
``add_quantize_argument(parser)`` and ``config = quantize_config(args)``."""

from __future__ import annotations

import argparse

from taperfx.quantize.config import QuantizeConfig, parse_scheme

__all__ = ["add_quantize_argument", "quantize_config"]


def add_quantize_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--quantize",
        metavar="SCHEME",
        help="weight-only quantization after fold: int4 (group 32), int4:g64, int4:g128 or int8",
    )
    parser.add_argument(
        "--quantize-head",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="quantize the output projection too (untied from the embedding); default: yes",
    )
    parser.add_argument(
        "--quantize-embedding",
        action="store_true",
        help="store the token embedding quantized as well (default: its gather stays exact)",
    )


def quantize_config(args: argparse.Namespace) -> QuantizeConfig | None:
    """The config the command line asks for, or None without ``--quantize``; an unknown scheme raises
    ``UnknownScheme``."""
    if not args.quantize:
        return None
    return parse_scheme(args.quantize, head=args.quantize_head, embedding=args.quantize_embedding)
