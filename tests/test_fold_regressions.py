"""One regression test per fold-soundness finding (issue 10 items 1-6, 8, 11-13), each fixed at its root.

Every test compares outputs itself and asserts reason codes, never report wording.
"""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import taperfx
from taperfx.passes import FoldError

from helpers.tapering import taper_to

D = 8


def _ln(width: int = D) -> taperfx.TaperLayerNorm:
    norm = taperfx.TaperLayerNorm(width)
    with torch.no_grad():
        norm.weight_tilde.normal_(1.0, 0.3)
        norm.bias.normal_(0.0, 0.5)
    return norm


class NormThen(nn.Module):
    """A gate-zero TaperLN whose output ``forward_rest(self, h)`` consumes; linears a, b share state as set up."""

    def __init__(self, rest, *, square: bool = True) -> None:
        super().__init__()
        self.norm = taperfx.TaperLayerNorm(D)
        self.a = nn.Linear(D, D)
        self.b = nn.Linear(D, D if square else 2 * D)
        self.rest = rest

    def forward(self, x):
        return self.rest(self, self.norm(x))


def _gate_zero(model: nn.Module, x: torch.Tensor) -> nn.Module:
    torch.manual_seed(0)
    taper_to(model, x)
    with torch.no_grad():
        for norm in taperfx.tapernorms(model):
            norm.weight_tilde.normal_(1.0, 0.3)
            if getattr(norm, "bias", None) is not None:
                norm.bias.normal_(0.0, 0.5)
    return model


def _export(model, *args, decompose=False):
    with torch.no_grad():
        program = torch.export.export(model, args)
    return program.run_decompositions() if decompose else program


def _same(got, want, scale: float = 1e-5) -> None:
    torch.testing.assert_close(got, want, rtol=0, atol=scale * max(want.abs().max().item(), 1.0))


@pytest.mark.parametrize("decompose", [False, True])
def test_1_two_linears_sharing_one_bias_keep_their_own_corrections(decompose):
    torch.manual_seed(1)
    model = NormThen(lambda m, h: torch.cat([m.a(h), m.b(h)], -1))
    model.b.bias = model.a.bias  # one bias Parameter, two weights: b + W_a β and b + W_b β differ
    x = torch.randn(2, 3, D)
    _gate_zero(model, x)
    program = _export(model, x, decompose=decompose)
    folded, report = taperfx.fold_program(program)
    assert report.codes == {"norm": "shared_bias_conflict"}
    assert [(s["name"], s["code"]) for s in json.loads(json.dumps(report.to_json()))["skipped"]] == [
        ("norm", "shared_bias_conflict")
    ]
    _same(folded.module()(x), model(x))


@pytest.mark.slow  # Inductor compiles the model (about 10 s, more on a worker's first compile)
def test_1_shared_bias_through_the_compile_backend():
    torch.manual_seed(1)
    model = NormThen(lambda m, h: torch.cat([m.a(h), m.b(h)], -1))
    model.b.bias = model.a.bias
    x = torch.randn(2, 3, D)
    _gate_zero(model, x)
    torch._dynamo.reset()
    with torch.no_grad():
        _same(torch.compile(model, backend="taperfx")(x), model(x), 1e-4)


def test_1_a_shared_bias_with_equal_corrections_folds_once():
    torch.manual_seed(1)
    model = NormThen(lambda m, h: m.a(h) + m.b(h))
    model.b.bias = model.a.bias
    x = torch.randn(2, 3, D)
    _gate_zero(model, x)
    with torch.no_grad():
        model.norm.bias.zero_()  # β = 0: both linears keep b as it is
    folded, report = taperfx.fold_program(_export(model, x), strict=True)
    assert [f.name for f in report.folded] == ["norm"] and report.params_added == []
    _same(folded.module()(x), model(x))


def test_2_one_weight_read_in_two_orientations_is_a_layout_conflict():
    torch.manual_seed(2)
    model = NormThen(lambda m, h: F.linear(h, m.a.weight) + h @ m.a.weight)
    x = torch.randn(2, 3, D)
    _gate_zero(model, x)
    program = _export(model, x, decompose=True)
    folded, report = taperfx.fold_program(program)
    assert report.codes == {"norm": "layout_conflict"}
    _same(folded.module()(x), model(x))


def test_3_a_centering_with_alpha_is_not_read_as_a_mean_subtraction():
    class AlphaNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(D))
            self.linear = nn.Linear(D, D)

        def forward(self, h):
            centered = torch.sub(h, h.mean(-1, keepdim=True), alpha=0.5)
            return self.linear(centered * self.weight)

    torch.manual_seed(3)
    model = AlphaNorm().eval()
    x = torch.randn(2, 3, D)
    for decompose in (False, True):
        folded, report = taperfx.fold_program(_export(model, x, decompose=decompose))
        assert [f.kind for f in report.folded] == ["rms"]  # only the scale folds; the sub with alpha stays
        assert any(n.kwargs.get("alpha") == 0.5 for n in folded.graph.nodes)
        _same(folded.module()(x), model(x))


def test_3_addmm_with_beta_is_refused_by_code():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = _ln()
            self.weight = nn.Parameter(torch.randn(D, D))
            self.bias = nn.Parameter(torch.randn(D))

        def forward(self, h):
            return torch.addmm(self.bias, self.norm(h), self.weight, beta=0.5)

    torch.manual_seed(3)
    x = torch.randn(4, D)
    model = _gate_zero(Scaled(), x)
    folded, report = taperfx.fold_program(_export(model, x))
    assert report.codes == {"norm": "keyword_changes_meaning"}
    _same(folded.module()(x), model(x))


class Flagged(nn.Module):
    """The final norm feeds the head, or (flag) is returned as the hidden state: a path the trace may not see."""

    def __init__(self):
        super().__init__()
        self.norm = taperfx.TaperLayerNorm(D)
        self.head = nn.Linear(D, 5)

    def forward(self, x, return_hidden: bool = False):
        h = self.norm(x)
        return h if return_hidden else self.head(h)


def test_4_fold_module_refuses_a_call_path_its_trace_did_not_see():
    torch.manual_seed(4)
    x = torch.randn(2, 3, D)
    model = _gate_zero(Flagged(), x)
    folded, report = taperfx.fold_module(model, (x,))
    assert [f.name for f in report.folded] == ["norm"] and report.verified
    _same(folded(x), model(x))
    with pytest.raises(FoldError) as untraced:
        folded(x, return_hidden=True)
    assert untraced.value.code == "untraced_call_path"
    with pytest.raises(FoldError) as direct:
        folded.norm(x)
    assert direct.value.code == "untraced_call_path"
    _same(folded(x), model(x))  # the guard resets: the traced path still works after a refusal
    unguarded, _ = taperfx.fold_module(model, (x,), guard_calls=False)
    assert isinstance(unguarded.norm, nn.Identity)
    _same(unguarded(x), model(x))


def test_4_the_call_path_guard_survives_deepcopy():
    """A copy's guard watches the copy (quantize and users deep-copy folded modules)."""
    torch.manual_seed(4)
    x = torch.randn(2, 3, D)
    model = _gate_zero(Flagged(), x)
    folded, _ = taperfx.fold_module(model, (x,))
    twin = copy.deepcopy(folded)
    _same(twin(x), model(x))
    _same(folded(x), model(x))
    with pytest.raises(FoldError) as untraced:
        twin(x, return_hidden=True)
    assert untraced.value.code == "untraced_call_path"
    _same(twin(x), model(x))


def test_5_a_program_whose_input_is_named_input_folds():
    torch.manual_seed(5)
    x = torch.randn(2, 3, D)
    model = _gate_zero(nn.Sequential(_ln(), nn.Linear(D, D), nn.GELU(), nn.Linear(D, 4)), x)
    for decompose in (False, True):
        program = _export(model, x, decompose=decompose)
        assert any(n.name == "input" for n in program.graph.nodes)
        folded, report = taperfx.fold_program(program, strict=True)
        assert [f.name for f in report.folded] == ["0"] and report.verified
        _same(folded.module()(x), model(x))
        _same(torch.export.unflatten(folded)(x), model(x))


def test_6_a_2d_layernorm_into_a_bias_free_linear_after_decomposition():
    torch.manual_seed(6)
    x = torch.randn(5, D)
    model = _gate_zero(nn.Sequential(_ln(), nn.Linear(D, 3, bias=False)), x)
    folded, report = taperfx.fold_program(_export(model, x, decompose=True), strict=True)
    assert report.params_added == ["1.bias"]
    (addmm,) = [n for n in folded.graph.nodes if n.target is torch.ops.aten.addmm.default]
    assert addmm.meta["val"].shape == (5, 3) and addmm.meta["nn_module_stack"]  # new nodes keep their metadata
    assert all("val" in n.meta for n in folded.graph.nodes if n.op != "output")
    _same(folded.module()(x), model(x))
    torch._dynamo.reset()
    with torch.no_grad():
        _same(torch.compile(model, backend="taperfx")(x), model(x), 1e-4)


def test_8_a_transformer_encoder_fast_path_reads_its_norms_and_is_refused():
    torch.manual_seed(8)
    encoder = nn.TransformerEncoder(
        nn.TransformerEncoderLayer(D, 2, dim_feedforward=16, dropout=0.0, batch_first=True, norm_first=True),
        num_layers=2,
        enable_nested_tensor=False,
    )
    for layer in encoder.layers:
        layer.norm1, layer.norm2 = _ln(), _ln()
    x = torch.randn(2, 3, D)
    _gate_zero(encoder, x)
    folded, report = taperfx.fold_module(encoder, (x,))
    assert report.folded == []
    assert set(report.codes.values()) == {"read_outside_forward"} and len(report.codes) == 4
    with torch.no_grad():
        _same(folded(x), encoder(x))


def _three_forms(m, h):
    """Falcon's ``x @ W.T``, an eval-mode dropout before a linear, and ``F.linear(h, W.t())``."""
    return h @ m.a.weight.T + F.linear(F.dropout(h, 0.1, training=False), m.b.weight) + F.linear(h, m.w.t())


@pytest.mark.parametrize("decompose", [False, True])
def test_11_matmul_dropout_and_transposed_weights_are_matched(decompose):
    torch.manual_seed(11)
    model = NormThen(_three_forms)
    model.w = nn.Parameter(torch.randn(D, D))
    x = torch.randn(2, 3, D)
    _gate_zero(model, x)
    folded, report = taperfx.fold_program(_export(model, x, decompose=decompose), strict=True)
    assert [f.name for f in report.folded] == ["norm"] and report.layers_checked == 3
    _same(folded.module()(x), model(x))


def test_12_a_split_along_the_token_axis_folds_and_a_weight_operand_is_named():
    torch.manual_seed(12)
    model = NormThen(lambda m, h: torch.cat([m.a(part) for part in h.split(1, dim=1)], 1))
    x = torch.randn(2, 3, D)
    _gate_zero(model, x)
    model.a = nn.Linear(D, D)
    with torch.no_grad():
        program = _export(model, x)
    # a split along tokens keeps features: the single linear it feeds is called three times on pieces
    folded, report = taperfx.fold_program(program)
    assert [f.name for f in report.folded] == ["norm"]
    _same(folded.module()(x), model(x))

    weight_use = NormThen(lambda m, h: F.linear(m.a.weight, h.reshape(-1, D)[:D]))
    _gate_zero(weight_use, x)
    folded, report = taperfx.fold_program(_export(weight_use, x))
    assert report.codes == {"norm": "norm_output_as_weight"}


def test_12_a_split_of_the_feature_axis_is_named_so():
    model = NormThen(lambda m, h: torch.cat([m.a(p.repeat(1, 1, 2)) for p in h.split(D // 2, dim=-1)], -1))
    x = torch.randn(2, 3, D)
    _gate_zero(model, x)
    _, report = taperfx.fold_program(_export(model, x))
    assert report.codes == {"norm": "slices_feature_axis"}


def test_13_verify_accepts_exact_folds_of_large_fp32_logits():
    torch.manual_seed(13)
    x = torch.randn(4, 16, 64)
    model = nn.Sequential(_ln(64), nn.Linear(64, 512))
    _gate_zero(model, x)
    with torch.no_grad():
        model[1].weight.mul_(1000.0)  # logits of several thousand, as Gemma2's before its softcap
    program = _export(model, x)
    assert model(x).abs().max() > 3e3
    folded, report = taperfx.fold_program(program, strict=True)
    assert report.verified
    check = taperfx.verify(program, folded, (x,))
    (output,) = check.outputs
    assert output.ok and output.folded_error <= output.tolerance


def test_13_verify_accepts_exact_bf16_folds_and_rejects_a_wrong_one():
    torch.manual_seed(13)
    x = torch.randn(4, 16, 64)
    model = nn.Sequential(_ln(64), nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64))
    _gate_zero(model, x)
    model = model.to(torch.bfloat16)
    xb = x.to(torch.bfloat16)
    program = _export(model, xb)
    folded, report = taperfx.fold_program(program, strict=True)
    assert report.verified
    (output,) = taperfx.verify(program, folded, (xb,)).outputs
    assert output.folded_error <= output.tolerance
    wrong = {k: v.clone() for k, v in folded.state_dict.items()}
    name = next(k for k in wrong if k.endswith("1.weight"))
    folded.state_dict[name] = torch.nn.Parameter(wrong[name] * 1.05, requires_grad=False)
    (output,) = taperfx.verify(program, folded, (xb,)).outputs
    assert not output.ok
