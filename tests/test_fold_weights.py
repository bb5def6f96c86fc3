"""The blocked fold arithmetic equals docs/method.md §8 computed in float64 over the whole weight and rounded once.

"Rounded once": every folded element is within half a step of the stored dtype of the
float64 value (plus float64's own accumulation error, far below that step), where a
second rounding (say, through float32 on the way to bfloat16) would reach a whole step.
"""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from taperfx.passes.blockfold import fold_in_place
from taperfx.passes.weights import BLOCK_ELEMENTS, fold_linear


@given(
    out_features=st.integers(1, 3 * (BLOCK_ELEMENTS // 33)),  # width 33: up to three blocks
    width=st.sampled_from([3, 7, 8, 33]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float64]),
    centered=st.booleans(),
    shifted=st.booleans(),
    has_bias=st.booleans(),
    in_out=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_blocks_match_the_whole_weight_in_float64(
    out_features, width, dtype, centered, shifted, has_bias, in_out, seed
):
    g = torch.Generator().manual_seed(seed)
    rows = (torch.randn(out_features, width, generator=g) * 7).to(dtype)  # (out, in)
    weight = rows.t().contiguous() if in_out else rows
    scale, shift = torch.rand(width, generator=g) + 0.5, torch.randn(width, generator=g)
    bias = torch.randn(out_features, generator=g).to(dtype) if has_bias else None
    before = [t.clone() for t in (weight, bias) if t is not None]

    new_weight, new_bias = fold_linear(
        weight, scale, shift if shifted else None, bias, centered=centered, in_out=in_out
    )

    products = rows.double() * scale.double()
    want = products - products.mean(dim=1, keepdim=True) if centered else products
    got = new_weight.t() if in_out else new_weight
    assert got.dtype == dtype
    _assert_rounded_once(got, want, accumulated=products.abs().sum(dim=1, keepdim=True))
    if shifted:
        want_bias = rows.double() @ shift.double() + (bias.double() if has_bias else 0)
        # A dot product: blocked and whole BLAS calls may round differently in float64, never by a dtype's step.
        torch.testing.assert_close(new_bias, want_bias.to(new_bias.dtype))
    else:
        assert new_bias is bias
    assert all(torch.equal(a, b) for a, b in zip(before, [t for t in (weight, bias) if t is not None]))


def _assert_rounded_once(got: torch.Tensor, want: torch.Tensor, accumulated: torch.Tensor) -> None:
    """``|got − want| ≤ ½ step(dtype) at want + float64 accumulation error`` element by element; ``accumulated``
    bounds the magnitude the float64 sums of a row went through."""
    info = torch.finfo(got.dtype)
    half_step = info.eps / 2 * want.abs() + info.smallest_normal * info.eps / 2  # subnormals: a fixed step
    float64_error = 4 * want.shape[1] * torch.finfo(torch.float64).eps * accumulated
    excess = (got.double() - want).abs() - (half_step + float64_error)
    assert excess.max().item() <= 0, f"worst excess {excess.max().item():.3g}"


def test_folding_restores_the_thread_budget():
    """The pass holds torch's pool to one thread while it folds, and gives the budget back."""
    from taperfx.passes.weights import one_intra_op_thread

    before = torch.get_num_threads()
    with one_intra_op_thread() as budget:
        assert budget == before and torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("in_out", [False, True])
@pytest.mark.parametrize("centered", [False, True])
def test_every_tensor_of_a_fold_lives_on_the_weights_device(in_out, centered):
    """Device-agnostic by construction, checked without an accelerator: on the meta device every op runs
    (shapes only) and any tensor made on the host instead fails when it meets the weight's rows."""
    rows, features = 40, 24
    weight = torch.empty((features, rows) if in_out else (rows, features), device="meta")
    scale, shift, bias = torch.rand(features) + 0.5, torch.randn(features), torch.randn(rows)  # the norm's: host

    new_weight, new_bias = fold_linear(weight, scale, shift, bias, centered=centered, in_out=in_out)
    in_place = fold_in_place(weight, scale, shift, centered=centered, in_out=in_out, block_elements=100)

    assert new_weight.device.type == "meta" and new_weight.shape == weight.shape
    assert new_bias.device.type == "meta" and new_bias.shape == (rows,)
    assert in_place.new_bias(bias).device.type == "meta"
