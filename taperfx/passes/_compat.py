"""The private torch APIs the passes rely on, in one place, so a torch upgrade breaks here only."""

from __future__ import annotations

import torch
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._pytree import tree_leaves

__all__ = ["ASSERT_TENSOR_METADATA", "fake_mode_of", "size_hint", "tree_leaves"]

# What torch.export inserts to check a cast's input dtype: a check with no output, not arithmetic.
ASSERT_TENSOR_METADATA = torch.ops.aten._assert_tensor_metadata.default


def fake_mode_of(graph: torch.fx.Graph):
    """A FakeTensorMode for new ``meta["val"]`` tensors of ``graph``: the active tracing context's (Inductor's
    post-grad graph), else that of the graph's first fake value, else None.

    Not ``detect_fake_mode`` over every value: a real-mode ``make_fx`` trace gives each ``get_attr``
    value its own mode, and that asserts on the mix.
    """
    active = detect_fake_mode()
    if active is not None:
        return active
    return next((n.meta["val"].fake_mode for n in graph.nodes if isinstance(n.meta.get("val"), FakeTensor)), None)


def size_hint(value, fallback: int = 8) -> int:
    """A concrete int for a possibly symbolic size: its example value (export and Dynamo keep one)."""
    from torch.fx.experimental.symbolic_shapes import optimization_hint

    return optimization_hint(value, fallback=fallback) if isinstance(value, torch.SymInt) else int(value)
