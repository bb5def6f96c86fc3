"""``--device`` for the commands that run a model: the name checked when parsed, CUDA's presence before loading."""

from __future__ import annotations

import argparse
import re

from taperfx.errors import BadInput

_NAME = re.compile(r"cpu|cuda(:\d+)?")


def device_name(text: str) -> str:
    """argparse ``type``: ``cpu``, ``cuda`` or ``cuda:N`` (anything else is a usage error, exit 2)."""
    if not _NAME.fullmatch(text):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    return text


def require_device(name: str) -> None:
    """Refuse a CUDA device torch cannot see, before a model is loaded onto it."""
    if name.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise BadInput(f"--device {name}: torch sees no CUDA device", code="no-cuda")
