"""TaperNorm limits (docs/method.md §2–§4): the exact norm at g = 1, the exact fixed map at g = 0."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from taperfx import CalibrationError, TaperLayerNorm, TaperRMSNorm, calibrate, set_gate, start_taper

DTYPES = st.sampled_from([torch.float32, torch.bfloat16])
shapes = st.tuples(st.integers(1, 3), st.integers(1, 5), st.integers(1, 70))


def _randomised(module: nn.Module, seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5 + 1.0)
    return module


def _calibrated(norm, x):
    return calibrate(norm, [x])


class OpRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@given(shapes, DTYPES, st.integers(0, 2**16), st.sampled_from([None, 1e-6, 1e-3]))
def test_rms_gate_one_is_rmsnorm(shape, dtype, seed, eps):
    d = shape[-1]
    ref = _randomised(nn.RMSNorm(d, eps=eps), seed).to(dtype)
    taper = TaperRMSNorm(d, eps=eps).to(dtype)
    taper.weight.data.copy_(ref.weight)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
    assert torch.equal(taper(x), ref(x))


@given(shapes, DTYPES, st.integers(0, 2**16), st.booleans())
def test_ln_gate_one_is_layernorm(shape, dtype, seed, bias):
    d = shape[-1]
    ref = _randomised(nn.LayerNorm(d, eps=1e-5, bias=bias), seed).to(dtype)
    taper = TaperLayerNorm(d, eps=1e-5, bias=bias).to(dtype)
    taper.load_state_dict(ref.state_dict(), strict=False)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
    assert torch.equal(taper(x), ref(x))


@given(shapes, DTYPES, st.integers(0, 2**16))
def test_rms_gate_zero_is_diagonal_map(shape, dtype, seed):
    d = shape[-1]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen).to(dtype)
    norm = _calibrated(_randomised(TaperRMSNorm(d), seed), x.float()).to(dtype)
    with torch.no_grad():
        norm.weight_tilde.copy_(torch.randn(d, generator=gen))
    set_gate(norm, 0.0)
    expected = x * (norm.c * norm.weight_tilde)
    assert torch.equal(norm(x), expected)


@given(shapes, DTYPES, st.integers(0, 2**16))
def test_ln_gate_zero_is_affine_map(shape, dtype, seed):
    d = shape[-1]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen) * 2 + 0.5
    norm = _calibrated(_randomised(TaperLayerNorm(d), seed), x)
    set_gate(norm, 0.0)
    x64 = x.double()
    expected = (x64 - x64.mean(-1, keepdim=True)) * (norm.c.double() * norm.weight_tilde.double()) + norm.bias.double()
    torch.testing.assert_close(norm(x).double(), expected, rtol=1e-5, atol=1e-5)
    norm, x = norm.to(dtype), x.to(dtype)
    assert norm(x).dtype == dtype


@given(st.floats(0.0, 1.0), st.integers(1, 40), st.integers(0, 2**16), st.booleans())
def test_blend_matches_equation(g, d, seed, layer_norm):
    """Between the ends, y = g·norm(x) + (1 − g)·map(x) with β added once (eqs. 3 and 6)."""
    x = torch.randn(4, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    norm = _calibrated(_randomised((TaperLayerNorm if layer_norm else TaperRMSNorm)(d, eps=1e-6), seed).double(), x)
    set_gate(norm, g)
    s = norm.c * norm.weight_tilde
    if layer_norm:
        xc = x - x.mean(-1, keepdim=True)
        sigma = torch.sqrt(xc.square().mean(-1, keepdim=True) + 1e-6)
        expected = g * xc / sigma * norm.weight + (1 - g) * xc * s + norm.bias
    else:
        r = torch.sqrt(x.square().mean(-1, keepdim=True) + 1e-6)
        expected = g * x / r * norm.weight + (1 - g) * x * s
    torch.testing.assert_close(norm(x), expected)


@pytest.mark.parametrize(
    "cls, forbidden",
    [
        (TaperRMSNorm, {"rms_norm", "_fused_rms_norm", "mean", "rsqrt", "sqrt", "pow", "norm"}),
        (TaperLayerNorm, {"layer_norm", "native_layer_norm", "var", "var_mean", "std", "rsqrt", "sqrt", "pow"}),
    ],
)
def test_gate_zero_computes_no_per_token_statistics(cls, forbidden):
    x = torch.randn(2, 3, 16)
    norm = _calibrated(cls(16), x)
    set_gate(norm, 0.0)
    norm.eval()
    with OpRecorder() as rec:
        norm(x)
    assert rec.ops, "the recorder saw no op at all"
    assert not forbidden & set(rec.ops), rec.ops
    set_gate(norm, 1.0)
    with OpRecorder() as rec:
        norm(x)
    assert forbidden & set(rec.ops), "the recorder must see the statistics at g = 1"


def test_calibration_matches_least_squares():
    """c from the EMAs = argmin_c E‖(x/r(x))⊙γ − c·x⊙γ‖² (docs/method.md §4), for RMS and LN."""
    gen = torch.Generator().manual_seed(0)
    d = 24
    batches = [torch.randn(8, 5, d, generator=gen) * (1 + 3 * torch.rand(8, 5, 1, generator=gen)) for _ in range(6)]
    for cls in (TaperRMSNorm, TaperLayerNorm):
        norm = _randomised(cls(d, eps=1e-5, ema_alpha=1.0), 3).train()
        gamma = norm.weight.detach().double()
        for xb in batches:
            norm(xb)
        # alpha = 1: the EMA is the last batch; the least-squares solution on that batch:
        x = batches[-1].reshape(-1, d).double()
        if cls is TaperLayerNorm:
            x = x - x.mean(-1, keepdim=True)
        r = torch.sqrt(x.square().mean(-1, keepdim=True) + 1e-5)
        target = (x / r * gamma).reshape(-1, 1)
        design = (x * gamma).reshape(-1, 1)
        c_star = torch.linalg.lstsq(design, target).solution.item()
        start_taper(norm)
        assert norm.c.item() == pytest.approx(c_star, rel=1e-5)
        assert torch.equal(norm.weight_tilde, norm.weight)


def test_calibration_ema_is_bias_corrected():
    """With a constant statistic, the bias-corrected EMA equals it after any number of steps."""
    x = torch.randn(4, 7, 32)
    for steps in (1, 2, 10):
        norm = TaperRMSNorm(32, ema_alpha=0.01).train()
        for _ in range(steps):
            norm(x)
        once = TaperRMSNorm(32, ema_alpha=1.0).train()
        once(x)
        torch.testing.assert_close(norm.calibrated_c, once.calibrated_c)


def test_calibration_stops_at_taper_start_and_eval_does_not_observe():
    x = torch.randn(2, 3, 8)
    norm = TaperRMSNorm(8).eval()
    norm(x)
    assert int(norm.ema_steps) == 0
    norm.train()
    norm(x)
    start_taper(norm)
    c = norm.c.clone()
    norm(x * 10)
    assert int(norm.ema_steps) == 1 and torch.equal(norm.c, c)


def test_gate_round_trips_through_state_dict():
    x = torch.randn(2, 8)
    norm = _calibrated(TaperRMSNorm(8), x)
    set_gate(norm, 0.0)
    fresh = TaperRMSNorm(8)
    fresh.load_state_dict(norm.state_dict())
    assert fresh.gate_value == 0.0 and fresh.is_calibrated
    assert torch.equal(fresh(x), norm(x))


def test_bad_input_errors():
    norm = TaperRMSNorm(8)
    with pytest.raises(ValueError, match="last dimension 8"):
        norm(torch.randn(2, 9))
    with pytest.raises(CalibrationError) as err:
        norm.set_gate(0.5)
    assert err.value.code == "not_calibrated"
    with pytest.raises(CalibrationError) as err:
        start_taper(norm)
    assert err.value.code == "no_calibration_batch" and not norm.is_calibrated
    norm.train()(torch.randn(2, 8))
    start_taper(norm)
    assert norm.is_calibrated
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="gate must lie in"):
            set_gate(norm, bad)
    with pytest.raises(ValueError, match="positive"):
        TaperRMSNorm(0)
    with pytest.raises(ValueError, match="last axis"):
        TaperLayerNorm((4, 8))


@pytest.mark.parametrize("cls", [TaperRMSNorm, TaperLayerNorm])
def test_start_taper_refuses_to_freeze_a_nonfinite_c(cls):
    """A calibration batch with an Inf activation leaves NaN/Inf in the EMAs for good: c is refused."""
    norm = cls(8).train()
    x = torch.randn(3, 8)
    x[1, 2] = float("inf")
    norm(x)
    norm(torch.randn(3, 8))
    with pytest.raises(CalibrationError) as err:
        norm.start_taper()
    assert err.value.code == "nonfinite_calibration"
    assert not norm.is_calibrated and norm.c.item() == 1.0 and norm.gate_value == 1.0
