"""A norm folds through ops that keep every feature in place, and stays behind ops that do not."""

import pytest
import torch
from torch import nn

import taperfx

from helpers.fold_stacks import computing_layers


class Passed(nn.Module):
    """A gate-zero TaperLN-like map ``(x − mean x) ⊙ (c·γ̃) + β``, then ``between``, then a linear."""

    def __init__(self, width: int, between, out: int = 5) -> None:
        super().__init__()
        self.norm = GateZeroNorm(width)
        self.linear = nn.Linear(width, out)
        self.between = between

    def forward(self, x):
        return self.linear(self.between(self.norm(x)))


class GateZeroNorm(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight_tilde = nn.Parameter(torch.randn(width))
        self.bias = nn.Parameter(torch.randn(width))
        self.register_buffer("c", torch.tensor(0.7))

    def forward(self, x):
        return (x - x.mean(-1, keepdim=True)) * (self.c * self.weight_tilde) + self.bias


KEEPS_FEATURES = {
    "same-shape view (GPT-2 ln_f)": lambda y: y.view(y.shape),
    "flatten leading axes": lambda y: y.reshape(-1, y.shape[-1]),
    "split a leading axis": lambda y: y.reshape(y.shape[0], 2, -1, y.shape[-1]),
    "full slice (Llama logits_to_keep=0)": lambda y: y[:, slice(0, None), :],
    "slice of the sequence axis": lambda y: y[:, 1:],
    "select the last token": lambda y: y[:, -1],
    "slice of the batch axis": lambda y: y.narrow(0, 0, 1),
    "expand a leading axis": lambda y: y[None].expand(3, *y.shape),
    "clone": lambda y: y.clone(),
    "contiguous after transpose of leading axes": lambda y: y.transpose(0, 1).contiguous(),
    "detach": lambda y: y.detach(),
    "chain": lambda y: y[:, :2].reshape(-1, y.shape[-1]).clone(),
}


# After run_decompositions() a linear on a non-contiguous input becomes expand + bmm, which is not matched.
NON_CONTIGUOUS = ("slice of the sequence axis", "expand a leading axis")


def _fold_case(between, decompose):
    torch.manual_seed(0)
    model = Passed(8, between).eval()
    x = torch.randn(2, 4, 8)
    with torch.no_grad():
        program = torch.export.export(model, (x,))
    return model, x, program.run_decompositions() if decompose else program


@pytest.mark.parametrize(
    "name, decompose",
    [(name, False) for name in KEEPS_FEATURES]
    + [(name, True) for name in KEEPS_FEATURES if name not in NON_CONTIGUOUS],
)
def test_the_map_folds_through_ops_that_keep_the_feature_axis(name, decompose):
    model, x, program = _fold_case(KEEPS_FEATURES[name], decompose)
    folded, report = taperfx.fold_program(program, strict=True, verify=True)
    assert [f.name for f in report.folded] == ["norm"]
    assert "norm" not in computing_layers(folded)
    torch.testing.assert_close(folded.module()(x * 3 + 1), model(x * 3 + 1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", NON_CONTIGUOUS)
def test_a_linear_decomposed_to_expand_and_bmm_is_reported(name):
    _, x, program = _fold_case(KEEPS_FEATURES[name], decompose=True)
    folded, report = taperfx.fold_program(program)
    assert report.folded == [] and report.codes == {"norm": "decomposed_bmm"}
    assert taperfx.verify(program, folded, (x,)).ok


# The input is (2, 8, 8): sequence length = width, so a shape check alone would let these through.
MOVES_FEATURES = {
    "slice of the feature axis": (lambda y: y[..., :4].repeat(1, 1, 2), "slices_feature_axis"),
    "select along the feature axis": (lambda y: y.select(-1, 0), "slices_feature_axis"),
    "transpose of the feature axis": (lambda y: y.transpose(-1, -2), "moves_feature_axis"),
    "reshape through another feature width": (
        lambda y: y.reshape(2, 16, 4).reshape(2, 8, 8),
        "reshapes_feature_axis",
    ),
}


@pytest.mark.parametrize("between, code", MOVES_FEATURES.values(), ids=MOVES_FEATURES.keys())
def test_the_map_stays_behind_ops_that_move_features(between, code):
    torch.manual_seed(0)
    model = Passed(8, between).eval()
    x = torch.randn(2, 8, 8)
    with torch.no_grad():
        program = torch.export.export(model, (x,))
    folded, report = taperfx.fold_program(program)
    assert report.folded == [] and report.codes == {"norm": code}
    assert taperfx.verify(program, folded, (x,)).ok


class CastBefore(nn.Module):
    """A gate-zero RMS map with a small scale on float32, then a cast to ``dtype`` and a linear in ``dtype``."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.norm = taperfx.TaperRMSNorm(8)
        self.linear = nn.Linear(8, 5).to(dtype)
        self.dtype = dtype

    def forward(self, x):
        return self.linear(self.norm(x).to(self.dtype)).float()


@pytest.mark.parametrize(
    "dtype, code", [(torch.bfloat16, None), (torch.float64, None), (torch.float16, "narrowing_cast")]
)
def test_a_cast_passes_only_when_its_range_holds_the_norms_input(dtype, code):
    """Folded, float16 would cast the norm's input where the original cast its output: an activation of
    1e5 that the scale brings to 100 overflows to inf. bfloat16 holds float32's range."""
    torch.manual_seed(0)
    x = torch.randn(2, 4, 8)
    model = CastBefore(dtype)
    taperfx.calibrate(model, [(x,)])
    taperfx.set_gate(model, 0.0)
    with torch.no_grad():
        model.eval().norm.weight_tilde.fill_(1e-3)
        program = torch.export.export(model, (x,))
        folded, report = taperfx.fold_program(program)
        outlier = x.clone()
        outlier[0, 0, 3] = 1e5
        got, want = folded.module()(outlier), model(outlier)
    assert report.codes == ({} if code is None else {"norm": code})
    assert torch.isfinite(want).all()
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)
