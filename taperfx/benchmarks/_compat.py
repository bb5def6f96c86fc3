"""The private torch APIs the decode benchmark uses, in one place, so a torch upgrade that moves them breaks here."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["TorchDispatchMode", "raise_recompile_limit"]


def raise_recompile_limit(limit: int) -> None:
    """Let Dynamo keep at least ``limit`` compiled graphs per code object (its private config's default is 8)."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)
