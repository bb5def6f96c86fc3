"""The private torch APIs the passes rely on, in one place, so a torch upgrade breaks here only."""

from __future__ import annotations

import torch
from torch.utils._pytree import tree_leaves

__all__ = ["ASSERT_TENSOR_METADATA", "size_hint", "tree_leaves"]

# What torch.export inserts to check a cast's input dtype: a check with no output, not arithmetic.
ASSERT_TENSOR_METADATA = torch.ops.aten._assert_tensor_metadata.default


def size_hint(value, fallback: int = 8) -> int:
    """A concrete int for a possibly symbolic size: its example value (export and Dynamo keep one)."""
    from torch.fx.experimental.symbolic_shapes import optimization_hint

    return optimization_hint(value, fallback=fallback) if isinstance(value, torch.SymInt) else int(value)
