"""Every path on which the fold refuses, and what it reports."""

import pytest
import torch
from torch import nn

import taperfx

from helpers.fold_stacks import Stack, computing_layers, gate_zero
from helpers.tapering import taper_to

VOCAB = 29


def _export(model, ids):
    with torch.no_grad():
        return torch.export.export(model, (ids,))


def _calibrated(ln=False, mode="internal", tied=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    model = Stack(vocab=VOCAB, width=8, layers=1, ln=ln, fused_qkv=False, swiglu=True, bias=False, tied=tied)
    ids = torch.randint(0, VOCAB, (2, 4), generator=g)
    return gate_zero(model, mode, ids, g), ids


def test_real_norms_are_reported_and_never_folded():
    model = Stack(vocab=VOCAB, width=8, layers=2, ln=True, fused_qkv=True, swiglu=False, bias=True, tied=False).eval()
    ids = torch.randint(0, VOCAB, (2, 4))
    program = _export(model, ids)
    folded, report = taperfx.fold_program(program)
    assert report.folded == []
    assert {s.name for s in report.skipped} == {
        "blocks.0.norm1",
        "blocks.0.norm2",
        "blocks.1.norm1",
        "blocks.1.norm2",
        "norm",
    }
    assert set(report.codes.values()) == {"real_norm"}
    with pytest.raises(taperfx.FoldError, match=r"blocks\.1\.norm2") as refused:
        taperfx.fold(program, strict=True)
    assert refused.value.code == "real_norm"


def test_a_strict_in_place_fold_refuses_before_it_rewrites_a_weight():
    """The refusal is known from the plan; raising after the weights were folded in place would leave the
    caller's model with folded weights under unfolded norms."""
    model, ids = _calibrated()
    program = _export(model, ids)
    before = {name: tensor.clone() for name, tensor in program.state_dict.items()}
    with pytest.raises(taperfx.FoldError) as refused:
        taperfx.fold(program, strict=True, inplace=True)
    assert refused.value.code == "real_norm"
    assert all(torch.equal(program.state_dict[name], tensor) for name, tensor in before.items())


@pytest.mark.parametrize("decompose", [False, True])
def test_a_gate_above_zero_is_never_folded(decompose):
    model, ids = _calibrated()
    taperfx.set_gate(model, 0.5)
    program = _export(model, ids)
    program = program.run_decompositions() if decompose else program
    folded, report = taperfx.fold_program(program)
    assert report.folded == []
    assert report.codes == {
        "blocks.0.norm1": "gate_above_zero",
        "blocks.0.norm2": "gate_above_zero",
        "norm": "real_norm",
    }
    check = taperfx.verify(program, folded, (ids,))
    assert check.ok and max(e.max_abs for e in check.outputs) == 0.0
    with pytest.raises(
        taperfx.FoldError, match=r"blocks\.0\.norm1[\s\S]*blocks\.0\.norm2|blocks\.0\.norm2[\s\S]*blocks\.0\.norm1"
    ):
        taperfx.fold(program, strict=True)


class FixedNorm(nn.Module):
    """A hand-written gate-zero RMS map ``x ⊙ (c·γ̃)`` whose output meets a given consumer."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight_tilde = nn.Parameter(torch.randn(width))
        self.register_buffer("c", torch.tensor(0.7))

    def forward(self, x):
        return x * (self.c * self.weight_tilde)


class Consumer(nn.Module):
    def __init__(self, width: int, use) -> None:
        super().__init__()
        self.norm = FixedNorm(width)
        self.linear = nn.Linear(width, width)
        self.small = nn.Linear(width // 2, width)
        self.use = use

    def forward(self, x):
        return self.use(self, self.norm(x))


@pytest.mark.parametrize(
    "use, code",
    [
        (lambda m, y: m.linear(y) + y.relu().sum(-1, keepdim=True), "not_a_linear_consumer"),
        (lambda m, y: m.small(y.view(*y.shape[:-1], 2, -1)).sum(-2), "reshapes_feature_axis"),
        (lambda m, y: m.small(y[..., : y.shape[-1] // 2]), "slices_feature_axis"),
        (lambda m, y: m.linear(y) + y, "not_a_linear_consumer"),
    ],
    ids=["relu", "reshape", "slice", "residual"],
)
def test_a_norm_with_a_consumer_that_is_not_a_linear_stays(use, code):
    model = Consumer(8, use).eval()
    x = torch.randn(2, 3, 8)
    program = _export(model, x)
    folded, report = taperfx.fold_program(program)
    assert report.folded == [] and report.codes == {"norm": code}
    assert "norm" in computing_layers(folded)
    assert taperfx.verify(program, folded, (x,)).ok
    with pytest.raises(taperfx.FoldError, match="norm"):
        taperfx.fold(program, strict=True)


def test_a_hand_written_map_feeding_only_linears_folds():
    model = Consumer(8, lambda m, y: m.linear(y) * m.linear(y).sigmoid()).eval()
    x = torch.randn(2, 3, 8)
    program = _export(model, x)
    folded, report = taperfx.fold_program(program, strict=True, verify=True)
    assert [f.name for f in report.folded] == ["norm"] and "norm" not in computing_layers(folded)
    assert {"norm.c", "norm.weight_tilde"} <= set(report.params_removed)


@pytest.mark.parametrize("ln", [False, True])
def test_a_shared_weight_is_left_or_untied_by_copy(ln):
    model, ids = _calibrated(ln=ln, mode="all", tied=True)
    program = _export(model, ids)
    kept, report = taperfx.fold_program(program)
    assert report.codes == {"norm": "shared_weight"}
    untied, report = taperfx.fold_program(program, untie_shared=True, strict=True, verify=True)
    assert "norm" in {f.name for f in report.folded} and "norm" not in computing_layers(untied)
    assert any(name.endswith("_folded") for name in report.params_added)
    assert report.bytes_saved < 0  # the copy of the embedding costs memory; the report says how much
    with pytest.raises(taperfx.FoldError) as refused:
        taperfx.fold(program, strict=True)
    assert refused.value.code == "shared_weight"


def test_fold_module_refuses_a_norm_called_twice():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = taperfx.TaperRMSNorm(8)
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            return self.a(self.norm(x)) + self.b(self.norm(x + 1))

    model = Twice()
    x = torch.randn(2, 3, 8)
    taper_to(model, x)
    folded, report = taperfx.fold_module(model, (x,))
    assert report.folded == [] and report.codes == {"norm": "called_more_than_once"}
    assert isinstance(folded.norm, taperfx.TaperNorm)
    with pytest.raises(taperfx.FoldError, match="norm"):
        taperfx.fold_module(model, (x,), strict=True)


def test_bad_input_gets_a_clear_error():
    with pytest.raises(TypeError, match="ExportedProgram"):
        taperfx.fold(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="GraphModule"):
        taperfx.fold_graph_module(nn.Linear(2, 2))


def test_verify_catches_a_wrong_fold():
    model, ids = _calibrated(ln=True)
    program = _export(model, ids)
    folded = taperfx.fold(program)
    name = next(k for k in folded.state_dict if k.endswith("q.weight"))
    folded.state_dict[name] = torch.nn.Parameter(folded.state_dict[name] * 1.001, requires_grad=False)
    check = taperfx.verify(program, folded, (ids,))
    assert not check.ok and [e.ok for e in check.outputs] == [False]
    (error,) = check.outputs
    assert error.folded_error > error.tolerance and error.max_rel > taperfx.passes.TOLERANCES[torch.float32]
