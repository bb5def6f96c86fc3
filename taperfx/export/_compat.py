"""The private torch APIs the compile backend relies on (Inductor's entry points and hooks, Dynamo's
static-input marks), in one place, so a torch upgrade breaks here only."""

from __future__ import annotations

import torch
import torch._inductor
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

__all__ = [
    "CustomGraphPass",
    "get_hash_for_files",
    "inductor_compile",
    "inductor_mode_options",
    "inductor_option_names",
    "is_module_state",
]


def inductor_compile(gm: torch.fx.GraphModule, example_inputs: list, options: dict):
    """``torch._inductor.compile``: Inductor on an FX graph with config patches."""
    return torch._inductor.compile(gm, example_inputs, options=options)


def inductor_mode_options(mode: str) -> dict:
    """The config patches ``torch.compile(mode=...)`` stands for."""
    return dict(torch._inductor.list_mode_options(mode))


def inductor_option_names() -> set[str]:
    return set(torch._inductor.list_options())


def is_module_state(tensor: torch.Tensor) -> bool:
    """Whether Dynamo passed ``tensor`` as a module parameter or buffer (it marks those as static inputs)."""
    from torch._dynamo.utils import (
        get_static_address_type,  # here: importing Dynamo costs ~1 s, only the backend needs it
    )

    return get_static_address_type(tensor) is not None
