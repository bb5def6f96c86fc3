"""The global check runs the programs it compares; a program that mutates a buffer in ``forward`` (a step
counter, a cache) must come out of a fold in the state it went in, and so must the folded one.

Before, ``fold_program``'s check stepped the counter of the caller's program (and of the model whose
tensors export shares) once per run, and the folded program started from the stepped value: its first
call computed something else than the unfolded program's first call.
"""

import copy

import pytest
import torch
from torch import nn

import taperfx

from helpers.tapering import taper_to

D = 16


class Counted(nn.Module):
    """A gate-zero norm into a linear whose output is scaled by a counter the forward steps."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = taperfx.TaperLayerNorm(D)
        self.linear = nn.Linear(D, 4)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls.add_(1)
        return self.linear(self.norm(x)) * self.calls


def _model(x):
    torch.manual_seed(0)
    model = taper_to(Counted().double(), x)
    model.calls.zero_()
    return model


@pytest.mark.parametrize("inplace", [False, True])
def test_fold_program_leaves_mutated_buffers_as_they_were(inplace):
    x = torch.randn(2, 5, D, dtype=torch.float64)
    model = _model(x)
    with torch.no_grad():
        program = torch.export.export(model, (x,))
        unfolded = copy.deepcopy(program).module()
        folded, report = taperfx.fold_program(program, inplace=inplace)
        assert report.verified and [f.name for f in report.folded] == ["norm"]
        assert program.state_dict["calls"].item() == model.calls.item() == 0.0
        module = folded.module()
        for _ in range(2):
            torch.testing.assert_close(module(x), unfolded(x), rtol=1e-12, atol=1e-12)


def test_fold_module_leaves_mutated_buffers_as_they_were():
    x = torch.randn(2, 5, D, dtype=torch.float64)
    model = _model(x)
    folded, report = taperfx.fold_module(model, (x,))
    assert report.verified and folded.calls.item() == model.calls.item() == 0.0
    with torch.no_grad():
        for _ in range(2):
            torch.testing.assert_close(folded(x), model(x), rtol=1e-12, atol=1e-12)
