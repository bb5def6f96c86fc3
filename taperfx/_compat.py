"""The private torch APIs more than one package of taperfx needs, in one place, so a torch upgrade breaks here.

Each package keeps its own ``_compat.py`` for what only it uses (the fold's metadata
ops, the CPU quantization kernels); what both the fold and quantization passes need
to give new graph nodes their ``meta["val"]`` lives here.
"""

from __future__ import annotations

import torch
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import FakeTensor

__all__ = ["fake_mode_of"]


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
