"""convert() on models it did not create: what converts, what is refused (with which code), and the
outside-the-loop model-state API (calibrate, start_taper, set_gate, gate_of, is_calibrated)."""

import copy
import json
import pickle
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import taperfx
from taperfx import (
    CalibrationError,
    ConversionError,
    ConversionWarning,
    NormKind,
    Protocol,
    TaperLayerNorm,
    TaperRMSNorm,
)
from taperfx.errors import TaperfxError
from taperfx.norm_families import classify


class ForeignRMSNorm(nn.Module):
    """An RMSNorm of another library: recognised by behaviour, not by class."""

    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d) * 0.1 + 1)
        self.variance_epsilon = eps

    def forward(self, x):
        var = x.float().pow(2).mean(-1, keepdim=True)
        return (x * torch.rsqrt(var + self.variance_epsilon)).to(x.dtype) * self.weight


class OffsetRMSNorm(ForeignRMSNorm):
    """Gemma's way: the gain is stored as w and applied as 1 + w."""

    def forward(self, x):
        return super().forward(x) / self.weight * (1 + self.weight)


class ForeignLayerNorm(nn.Module):
    """Cohere's way: a bias-free LayerNorm written out, the epsilon under another name."""

    def __init__(self, d, eps=1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d) * 0.1 + 1)
        self.epsilon = eps

    def forward(self, x):
        xc = x - x.mean(-1, keepdim=True)
        return xc * torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + self.epsilon) * self.weight


class WrongEpsRMSNorm(ForeignRMSNorm):
    """Says eps = 1e-6 but computes with 1e-3: converting it would change its outputs."""

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-3) * self.weight


class GatedRMSNorm(ForeignRMSNorm):
    """Mamba2's gated norm: ``forward(x, gate)``; as an RMSNorm on x alone it would pass a probe."""

    def forward(self, x, gate=None):
        if gate is not None:
            x = x * nn.functional.silu(gate)
        return super().forward(x)


class RowOnlyNorm(ForeignRMSNorm):
    """Runs on 3-D input only."""

    def forward(self, x):
        if x.dim() != 3:
            raise ValueError("expects (batch, time, d)")
        return super().forward(x)


class TinyLM(nn.Module):
    def __init__(self, norm_cls, d=12, layers=3):
        super().__init__()
        self.emb = nn.Embedding(30, d)
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"norm": norm_cls(d), "proj": nn.Linear(d, d)}) for _ in range(layers)
        )
        self.ln_f = norm_cls(d)
        self.head = nn.Linear(d, 30)

    def forward(self, ids):
        h = self.emb(ids)
        for blk in self.blocks:
            h = h + blk["proj"](blk["norm"](h))
        return self.head(self.ln_f(h))


class GatedBlock(nn.Module):
    """A block with a gated norm beside an ordinary one, as in Mamba2's mixer."""

    def __init__(self, d=12):
        super().__init__()
        self.norm = nn.RMSNorm(d, eps=1e-6)
        self.gate_proj = nn.Linear(d, d)
        self.gated = GatedRMSNorm(d)
        self.out = nn.Linear(d, d)

    def forward(self, h):
        x = self.norm(h)
        return h + self.out(self.gated(x, self.gate_proj(x)))


def _ids(seed=0, shape=(2, 7)):
    return torch.randint(0, 30, shape, generator=torch.Generator().manual_seed(seed))


def _converted_quietly(model, mode="internal"):
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConversionWarning)
        return taperfx.convert(model, mode)


def _codes(record):
    return sorted((w.message.module, w.message.code) for w in record if isinstance(w.message, ConversionWarning))


@pytest.mark.parametrize(
    "norm_cls, taper_cls",
    [
        (ForeignRMSNorm, TaperRMSNorm),
        (OffsetRMSNorm, TaperRMSNorm),
        (ForeignLayerNorm, TaperLayerNorm),
        (lambda d: nn.RMSNorm(d, eps=1e-6), TaperRMSNorm),
        (nn.LayerNorm, TaperLayerNorm),
        (lambda d: nn.LayerNorm(d, bias=False), TaperLayerNorm),
        (lambda d: nn.LayerNorm(d, elementwise_affine=False), TaperLayerNorm),
    ],
)
@pytest.mark.parametrize("mode", ["internal", "all"])
def test_convert_foreign_model_keeps_outputs(norm_cls, taper_cls, mode):
    torch.manual_seed(0)
    model = TinyLM(norm_cls).eval()
    ids = _ids()
    before = model(ids)
    assert _converted_quietly(model, mode) is model
    converted = [n for n, m in model.named_modules() if isinstance(m, taper_cls)]
    internal = [f"blocks.{i}.norm" for i in range(3)]
    assert converted == (internal if mode == "internal" else internal + ["ln_f"])
    assert taperfx.find_final_norm(model) == "ln_f"
    torch.testing.assert_close(model(ids), before, rtol=1e-6, atol=1e-6)


def test_offset_gain_becomes_one_plus_w():
    torch.manual_seed(0)
    model = TinyLM(OffsetRMSNorm)
    stored = model.blocks[0]["norm"].weight.detach().clone()
    _converted_quietly(model)
    torch.testing.assert_close(model.blocks[0]["norm"].weight.detach(), 1 + stored)
    assert torch.equal(model.blocks[0]["norm"].weight_tilde, model.blocks[0]["norm"].weight)


@pytest.mark.parametrize(
    "norm_cls, code, detail",
    [
        (WrongEpsRMSNorm, "other_maths", "matches none"),
        (RowOnlyNorm, "probe_failed", "ValueError"),
        (lambda d: nn.LayerNorm((3, d)), "multi_axis", "normalized_shape=(3, 12)"),
    ],
)
def test_unconvertible_norms_are_named_with_their_code(norm_cls, code, detail):
    model = TinyLM(norm_cls)
    with pytest.raises(ConversionError) as err:
        taperfx.convert(model)
    assert err.value.code == "no_norm" and code in str(err.value) and detail in str(err.value)
    assert not list(taperfx.tapernorms(model))


def test_gated_norm_is_left_alone_with_a_code_and_the_model_still_runs():
    torch.manual_seed(0)
    model = nn.Sequential(GatedBlock(), GatedBlock(), nn.RMSNorm(12)).eval()
    h = torch.randn(2, 5, 12)
    before = model(h)
    with pytest.warns(ConversionWarning) as record:
        taperfx.convert(model, "internal")
    assert _codes(record) == [("0.gated", "extra_forward_args"), ("1.gated", "extra_forward_args")]
    assert isinstance(model[0].gated, GatedRMSNorm) and isinstance(model[0].norm, TaperRMSNorm)
    assert isinstance(model[2], nn.RMSNorm)  # the final norm, kept in Internal mode
    torch.testing.assert_close(model(h), before, rtol=1e-6, atol=1e-6)
    taperfx.calibrate(model, [h])
    taperfx.set_gate(model, 0.0)
    assert torch.isfinite(model(h)).all()


def test_two_axis_norm_beside_convertible_ones_warns_with_its_code():
    model = nn.Sequential(
        nn.LayerNorm(8), nn.Unflatten(-1, (2, 4)), nn.LayerNorm((2, 4)), nn.Flatten(-2), nn.LayerNorm(8)
    )
    with pytest.warns(ConversionWarning) as record:
        taperfx.convert(model, "all")
    assert _codes(record) == [("2", "multi_axis")]
    assert [type(m).__name__ for m in model] == [
        "TaperLayerNorm",
        "Unflatten",
        "LayerNorm",
        "Flatten",
        "TaperLayerNorm",
    ]


def test_conversion_warning_pickles_with_its_data():
    with pytest.warns(ConversionWarning) as record:
        taperfx.convert(nn.Sequential(nn.LayerNorm(4), nn.LayerNorm((2, 2)), nn.LayerNorm(4)))
    warning = record[0].message
    again = pickle.loads(pickle.dumps(warning))
    assert (type(again), again.code, again.module, str(again)) == (
        ConversionWarning,
        "multi_axis",
        "1",
        str(warning),
    )
    for error in (ConversionError("m", "only_final_norm"), CalibrationError("m", "nonfinite_calibration")):
        again = pickle.loads(pickle.dumps(error))
        assert (type(again), again.code, again.exit_code) == (type(error), error.code, 2)
        assert isinstance(again, TaperfxError)  # the command line prints it as one line, exit 2


def test_single_norm_model_in_internal_mode_is_refused_with_a_code():
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 4))
    with pytest.raises(ConversionError) as err:
        taperfx.convert(model, "internal")
    assert err.value.code == "only_final_norm" and "1" in str(err.value)
    assert isinstance(model[1], nn.LayerNorm)
    with pytest.raises(ConversionError) as err:
        taperfx.start_taper(model)
    assert err.value.code == "no_tapernorm"
    taperfx.convert(model, "all")
    assert isinstance(model[1], TaperLayerNorm)


def test_explicit_final_norm_and_errors():
    model = TinyLM(nn.LayerNorm)
    taperfx.convert(model, "internal", final_norm="blocks.2.norm")
    assert isinstance(model.ln_f, TaperLayerNorm) and isinstance(model.blocks[2]["norm"], nn.LayerNorm)
    cases = [
        (lambda: taperfx.convert(TinyLM(nn.LayerNorm), "some"), "bad_mode"),
        (lambda: taperfx.convert(TinyLM(nn.LayerNorm), final_norm="nope"), "bad_final_norm"),
        (lambda: taperfx.convert(nn.Sequential(nn.Linear(3, 3))), "no_norm"),
        (lambda: taperfx.set_gate(nn.Linear(3, 3), 0.0), "no_tapernorm"),
        (lambda: taperfx.calibrate(nn.Linear(3, 3), [torch.randn(2, 3)]), "no_tapernorm"),
    ]
    for call, code in cases:
        with pytest.raises(ConversionError) as err:
            call()
        assert err.value.code == code


@pytest.mark.parametrize("norm_first", [True, False])
def test_transformer_encoder_fast_path_calls_the_tapernorms(norm_first):
    """PyTorch's fused encoder path (eval, no_grad) reads norm1/norm2's weights and computes a real
    LayerNorm; after convert the layers call their TaperNorms with and without gradients."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True, norm_first=norm_first)
    model = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(16), enable_nested_tensor=False).eval()
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        fused = model(x)
    _converted_quietly(model, "internal")
    assert sum(isinstance(m, TaperLayerNorm) for m in model.modules()) == 4
    with torch.no_grad():
        torch.testing.assert_close(model(x), fused, rtol=1e-5, atol=1e-5)
    taperfx.calibrate(model, [x])
    taperfx.set_gate(model, 0.0)
    with_grad = model(x).detach()  # parameters require grad: PyTorch takes the ordinary path
    with torch.no_grad():
        torch.testing.assert_close(model(x), with_grad)


def test_calibrate_then_taper_from_outside_a_training_loop():
    """The documented flow: convert a trained model, calibrate on a few batches, set g = 0."""
    torch.manual_seed(0)
    model = taperfx.convert(TinyLM(ForeignRMSNorm), "internal").eval()
    assert taperfx.gate_of(model) == 1.0 and not taperfx.is_calibrated(model)
    batches = [_ids(seed) for seed in range(3)]
    assert taperfx.calibrate(model, batches) is model
    assert not model.training  # the mode is restored
    norms = list(taperfx.tapernorms(model))
    assert len(norms) == 3 and all(int(m.ema_steps) == 3 and m.is_calibrated for m in norms)
    assert taperfx.is_calibrated(model) and taperfx.gate_of(model) == 1.0
    taperfx.set_gate(model, 0.0)
    assert taperfx.gate_of(model) == 0.0 and all(m.c.item() > 0 for m in norms)
    assert all(torch.equal(m.weight_tilde, m.weight) for m in norms)
    assert torch.isfinite(model(batches[0])).all()
    assert taperfx.gate_of(TinyLM(nn.LayerNorm)) is None


def test_calibrate_takes_tuples_and_dicts_of_arguments_and_refuses_twice_or_empty():
    model = taperfx.convert(TinyLM(ForeignRMSNorm), "all")
    with pytest.raises(CalibrationError) as err:
        taperfx.calibrate(model, [])
    assert err.value.code == "no_calibration_batch" and not taperfx.is_calibrated(model)
    taperfx.calibrate(model, [(_ids(),), {"ids": _ids(1)}])
    assert all(int(m.ema_steps) == 2 for m in taperfx.tapernorms(model))
    with pytest.raises(CalibrationError) as err:
        taperfx.calibrate(model, [_ids()])
    assert err.value.code == "already_calibrated"


def test_set_gate_below_one_needs_every_norm_calibrated_and_changes_none_otherwise():
    model = taperfx.convert(TinyLM(ForeignRMSNorm), "internal")
    taperfx.calibrate(model, [_ids()])
    late = TaperRMSNorm(12)
    model.blocks.append(nn.ModuleDict({"norm": late, "proj": nn.Linear(12, 12)}))
    with pytest.raises(CalibrationError) as err:
        taperfx.set_gate(model, 0.5)
    assert err.value.code == "not_calibrated"
    assert taperfx.gate_of(model) == 1.0


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_start_taper_refuses_a_nonfinite_calibration_and_freezes_nothing(bad):
    model = taperfx.convert(TinyLM(nn.LayerNorm), "all")
    ids = _ids()
    with torch.no_grad():
        model.emb.weight[ids[0, 0]] = bad
    model.train()
    model(ids)
    with pytest.raises(CalibrationError) as err:
        taperfx.start_taper(model)
    assert err.value.code == "nonfinite_calibration" and "blocks.0.norm" in str(err.value)
    assert not any(m.is_calibrated for m in taperfx.tapernorms(model))
    assert all(m.c.item() == 1.0 for m in taperfx.tapernorms(model))


def test_string_enums_serialise_as_the_bare_strings():
    assert json.dumps({"protocol": Protocol.ALL, "kind": NormKind.LN}) == '{"protocol": "all", "kind": "ln"}'
    assert Protocol("internal") is Protocol.INTERNAL and Protocol.tapering() == ("internal", "all")
    model = copy.deepcopy(TinyLM(nn.LayerNorm))
    taperfx.convert(model, Protocol.ALL)
    assert len(list(taperfx.tapernorms(model))) == 4


class WrittenNorm(nn.Module):
    """A norm written out by hand the way libraries do: any family, ε under any name, optional tensors."""

    def __init__(self, d, family, eps, eps_name, weight, bias, gen):
        super().__init__()
        self.family = family
        setattr(self, eps_name, eps)
        self.eps_name = eps_name
        self.weight = nn.Parameter(torch.randn(d, generator=gen) * 0.3 + 1) if weight else None
        self.bias = nn.Parameter(torch.randn(d, generator=gen) * 0.3) if bias else None
        if not weight:
            self.normalized_shape = (d,)  # how a weightless norm (OLMo's) states its width

    def forward(self, x):
        eps = getattr(self, self.eps_name)
        h = x.float()
        if self.family.startswith("ln"):
            h = h - h.mean(-1, keepdim=True)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        if self.weight is not None:
            h = h * ((1 + self.weight) if self.family.endswith("offset") else self.weight)
        if self.bias is not None:
            h = h + self.bias
        return h.to(x.dtype)


@given(
    family=st.sampled_from(["rms", "rms_offset", "ln", "ln_offset"]),
    d=st.integers(4, 40),
    eps=st.sampled_from([1e-6, 1e-5, 1e-3]),
    eps_name=st.sampled_from(["eps", "variance_epsilon", "epsilon"]),
    weight=st.booleans(),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=60, deadline=None)
def test_any_written_norm_converts_to_its_family_and_keeps_its_outputs(family, d, eps, eps_name, weight, bias, seed):
    gen = torch.Generator().manual_seed(seed)
    norm = WrittenNorm(d, family, eps, eps_name, weight, bias and family.startswith("ln"), gen)
    verdict = classify(norm)
    # Without a weight the offset is invisible: 1 + w with no w is the plain family.
    assert verdict.family.name == (family if weight else family.removesuffix("_offset"))
    assert verdict.eps == eps
    torch.manual_seed(seed)
    model = nn.Sequential(norm, nn.Linear(d, d), nn.LayerNorm(d))
    x = torch.randn(5, d, generator=gen) * 3 + 1
    before = model(x)
    _converted_quietly(model)
    assert isinstance(model[0], TaperLayerNorm if family.startswith("ln") else TaperRMSNorm)
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)


def test_meta_device_norm_is_refused_with_its_code():
    assert classify(nn.LayerNorm(8, device="meta")).refusal == "meta_tensors"


@pytest.mark.parametrize(
    "norm_cls, kind, eps",
    [(ForeignLayerNorm, NormKind.LN, 1e-5), (OffsetRMSNorm, NormKind.RMS, 1e-6), (nn.LayerNorm, NormKind.LN, 1e-5)],
)
def test_scale_anchor_reads_kind_and_epsilon_of_any_recognised_final_norm(norm_cls, kind, eps):
    anchor = taperfx.ScaleAnchor.attach(TinyLM(norm_cls))
    assert (anchor.kind, anchor.eps) == (kind, eps)
