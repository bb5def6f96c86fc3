"""A fold hands the ops between a norm and its linears the norm's *input* instead of the map's fresh output.

That input may be a slice (``norm(x[:, 1:])``), an expanded tensor, or a non-contiguous tensor handed to
the program, and a ``view`` after the norm (written by the user, or the one ``run_decompositions()`` puts
before ``mm``) cannot read it: the folded program raised where the original ran. Every entry point must
compute what the original computes, on the example inputs and on non-contiguous ones; the local check
probes with the traced strides (zero strides included).
"""

import copy

import pytest
import torch
from torch import nn

import taperfx

from helpers.tapering import taper_to

D = 16


class SlicedNorm(nn.Module):
    """A gate-zero LayerNorm of a token slice, read by one linear directly and one through a user ``view``."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = taperfx.TaperLayerNorm(D)
        self.q = nn.Linear(D, 8)
        self.k = nn.Linear(D, 8, bias=False)

    def forward(self, x):
        h = self.norm(x[:, 1:])
        return self.q(h), self.k(h.view(-1, D))


class InputNorm(nn.Module):
    """A gate-zero RMSNorm of the program's input, read by a linear (``view`` + ``mm`` once decomposed)."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = taperfx.TaperRMSNorm(D)
        self.out = nn.Linear(D, 8)

    def forward(self, x):
        return self.out(self.norm(x))


class ExpandedQueries(nn.Module):
    """Learned query tokens expanded over the batch (rows that share memory), then a gate-zero LayerNorm and
    a linear (as in a Q-Former): the norm's input has a zero stride."""

    def __init__(self) -> None:
        super().__init__()
        self.queries = nn.Parameter(torch.randn(1, 4, D))
        self.norm = taperfx.TaperLayerNorm(D)
        self.out = nn.Linear(D, 8)

    def forward(self, x):
        return self.out(self.norm(self.queries.expand(x.shape[0], -1, -1))) + x[:, :4, :8]


def _model(cls, x):
    torch.manual_seed(0)
    model = taper_to(cls().double(), x)
    with torch.no_grad():
        model.norm.weight_tilde.normal_(1.0, 0.3)
        if getattr(model.norm, "bias", None) is not None:
            model.norm.bias.normal_(0.0, 0.3)
    return model


def _close(got, want) -> None:
    for g, w in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("decompose", [False, True])
@pytest.mark.parametrize("inplace", [False, True])
def test_a_norm_of_a_slice_folds_through_views(decompose, inplace):
    x = torch.randn(2, 5, D, dtype=torch.float64)
    model = _model(SlicedNorm, x)
    with torch.no_grad():
        program = torch.export.export(model, (x,))
        program = copy.deepcopy(program.run_decompositions() if decompose else program)
        folded, report = taperfx.fold_program(program, strict=True, inplace=inplace)
        other = torch.randn(2, 5, D, dtype=torch.float64)
        _close(folded.module()(other), model(other))
    assert [f.name for f in report.folded] == ["norm"] and report.verified


def test_a_folded_decomposed_program_takes_a_non_contiguous_input():
    x = torch.randn(2, 5, D, dtype=torch.float64)
    model = _model(InputNorm, x)
    with torch.no_grad():
        program = torch.export.export(model, (x,)).run_decompositions()
        folded, report = taperfx.fold_program(program, strict=True)
        other = torch.randn(2, 9, D, dtype=torch.float64)[:, ::2]
        _close(folded.module()(other), model(other))
    assert [f.name for f in report.folded] == ["norm"]


@pytest.mark.parametrize("guard_calls", [True, False])
def test_fold_module_hands_a_viewed_norm_output_on_contiguous(guard_calls):
    x = torch.randn(2, 5, D, dtype=torch.float64)
    model = _model(SlicedNorm, x)
    folded, report = taperfx.fold_module(model, (x,), strict=True, guard_calls=guard_calls)
    other = torch.randn(2, 5, D, dtype=torch.float64)
    with torch.no_grad():
        _close(folded(other), model(other))
    assert [f.name for f in report.folded] == ["norm"] and report.verified


@pytest.mark.parametrize("decompose", [False, True])
def test_a_norm_of_an_expanded_tensor_folds(decompose):
    x = torch.randn(2, 5, D, dtype=torch.float64)
    model = _model(ExpandedQueries, x)
    with torch.no_grad():
        program = torch.export.export(model, (x,))
        folded, report = taperfx.fold_program(program.run_decompositions() if decompose else program, strict=True)
        other = torch.randn(2, 5, D, dtype=torch.float64)
        _close(folded.module()(other), model(other))
    assert [f.name for f in report.folded] == ["norm"] and report.verified
