"""Each quantized kernel against a float reference built from the same rounding (numbers, not eyeballing)."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import taperfx.quantize as tq
from taperfx.quantize import ops
from taperfx.quantize.handlers import handler_for
from taperfx.quantize.modules import QuantizedEmbedding, QuantizedLinear


def _linear(out_features: int, in_features: int, bias: bool, seed: int) -> torch.nn.Linear:
    torch.manual_seed(seed)
    return torch.nn.Linear(in_features, out_features, bias=bias)


def _bf16_bound(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Error of a bfloat16-activation matmul: activations rounded (2^-8 relative) plus bf16 output rounding."""
    return 2.0**-7 * (x.abs() @ weight.abs().t()) + 1e-6


@settings(max_examples=12)
@given(
    out_features=st.integers(1, 70),
    in_features=st.integers(1, 150),
    group=st.sampled_from(tq.GROUP_SIZES),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_int4_linear_matches_its_dequantized_weight(out_features, in_features, group, bias, seed):
    linear = _linear(out_features, in_features, bias, seed)
    config = tq.Int4WeightOnly(group_size=group)
    quantized = QuantizedLinear(handler_for(config).linear_kernel(linear.weight, config), linear.bias, 0, out_features)
    x = torch.randn(3, 2, in_features)
    reference = ops.dequantize_int4(linear.weight, group)
    want = F.linear(x.bfloat16().float(), reference, linear.bias)
    got = quantized(x)
    assert got.shape == want.shape and got.dtype == x.dtype
    assert ((got - want).abs() <= _bf16_bound(x, reference) + 1e-6).all()
    # The rounding itself: each weight within half a step of its group's scale.
    # The padding zeros belong to the last group's range, as in the packing.
    groups = F.pad(linear.weight.detach(), (0, -in_features % group)).reshape(out_features, -1, group)
    low, step = groups.amin(-1), (groups.amax(-1) - groups.amin(-1)) / 15
    # Half a step (the bfloat16 scale is rounded up by at most 2^-6), plus the bfloat16 rounding of the zero point.
    scale = step * (1 + 2.0**-6)
    bound = 0.5 * scale + 2.0**-8 * (low.abs() + 8 * scale)
    error = F.pad(reference - linear.weight.detach(), (0, -in_features % group)).reshape(out_features, -1, group)
    assert (error.abs() <= bound[..., None] + 1e-7).all()


@settings(max_examples=12)
@given(
    out_features=st.integers(1, 70),
    in_features=st.integers(1, 150),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_int8_linear_matches_its_dequantized_weight(out_features, in_features, bias, seed):
    linear = _linear(out_features, in_features, bias, seed)
    config = tq.Int8WeightOnly()
    quantized = QuantizedLinear(handler_for(config).linear_kernel(linear.weight, config), linear.bias, 0, out_features)
    x = torch.randn(5, in_features)
    reference = ops.dequantize_int8(linear.weight)
    want = F.linear(x.bfloat16().float(), reference, linear.bias)
    assert ((quantized(x) - want).abs() <= _bf16_bound(x, reference)).all()
    step = linear.weight.detach().abs().amax(-1, keepdim=True) / 127
    assert ((reference - linear.weight.detach()).abs() <= 0.5 * step * (1 + 2.0**-6)).all()


@pytest.mark.parametrize("config", [tq.Int4WeightOnly(group_size=32), tq.Int8WeightOnly()], ids=lambda c: c.name)
def test_quantized_embedding_gathers_rows_within_half_a_step(config):
    torch.manual_seed(0)
    table = torch.nn.Embedding(50, 64)
    embedding = QuantizedEmbedding(handler_for(config).embedding_kernel(table.weight, config), 50, 64)
    ids = torch.tensor([[0, 7, 49], [3, 3, 12]])
    got, want = embedding(ids), table(ids)
    assert got.shape == want.shape == (2, 3, 64) and got.dtype == torch.float32
    if isinstance(config, tq.Int4WeightOnly):
        rows = want.reshape(2, 3, -1, 32)
        step = ((rows.amax(-1) - rows.amin(-1)) / 15)[..., None].expand_as(rows).reshape(2, 3, 64)
    else:
        step = want.abs().amax(-1, keepdim=True) / 127
    assert ((got - want).abs() <= 0.5 * step + 1e-6).all()
    assert (got - want).abs().max() > 0  # it is quantized, not a copy


def test_refusals_have_codes():
    with pytest.raises(tq.UnknownScheme) as err:
        tq.parse_scheme("int3")
    assert err.value.code == "quantize-unknown-scheme"
    with pytest.raises(tq.UnknownScheme):
        tq.parse_scheme("int4:g48")
    with pytest.raises(tq.UnknownScheme):
        tq.Int4WeightOnly(group_size=16)
    with pytest.raises(tq.UnsupportedShape) as err:
        ops.pack_int4(torch.randn(2, 3, 4), 32)
    assert err.value.code == "quantize-unsupported-shape"
    with pytest.raises(tq.UnsupportedShape):
        ops.pack_int8(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(tq.UnsupportedShape):
        ops.pack_int4_rows(torch.randn(10, 48), 32)  # an embedding row must hold whole groups
    with pytest.raises(tq.NotQuantized) as err:
        tq.quantize(torch.nn.Sequential(torch.nn.ReLU()), tq.Int8WeightOnly())
    assert err.value.code == "quantize-nothing-matched"


def test_scheme_names_round_trip():
    assert tq.parse_scheme("int4") == tq.Int4WeightOnly(group_size=32)
    assert tq.parse_scheme("INT4:g128", head=False) == tq.Int4WeightOnly(group_size=128, head=False)
    assert tq.parse_scheme("int8", embedding=True) == tq.Int8WeightOnly(embedding=True)
    for config in (tq.Int4WeightOnly(group_size=64), tq.Int8WeightOnly()):
        assert tq.parse_scheme(config.name) == config
