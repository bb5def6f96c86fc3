"""Property-based equivalence of the fold over randomly built pre-norm stacks (docs/method.md §8)."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.export import Dim

import taperfx

from helpers.fold_stacks import Stack, computing_layers, gate_zero, taper_layer_names

VOCAB = 37


@st.composite
def stacks(draw):
    return dict(
        width=draw(st.sampled_from([6, 8, 12, 20, 36])),
        layers=draw(st.integers(1, 4)),
        ln=draw(st.booleans()),
        fused_qkv=draw(st.booleans()),
        swiglu=draw(st.booleans()),
        bias=draw(st.booleans()),
        tied=draw(st.booleans()),
        mode=draw(st.sampled_from(["internal", "all"])),
        dtype=draw(st.sampled_from([torch.float32, torch.float32, torch.bfloat16])),
        decompose=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


@pytest.mark.slow  # exports every generated stack (1-2 min)
@given(stacks())
def test_fold_preserves_outputs_and_removes_every_tapered_norm(case):
    g = torch.Generator().manual_seed(case["seed"])
    torch.manual_seed(case["seed"])
    model = Stack(vocab=VOCAB, **{k: case[k] for k in ("width", "layers", "ln", "fused_qkv", "swiglu", "bias", "tied")})
    ids = torch.randint(0, VOCAB, (2, 5), generator=g)
    model = gate_zero(model, case["mode"], ids, g).to(case["dtype"])
    batch, seq = Dim("batch"), Dim("seq", max=64)
    with torch.no_grad():
        program = torch.export.export(model, (ids,), dynamic_shapes=({0: batch, 1: seq},))
    if case["decompose"]:
        program = program.run_decompositions()

    folded, report = taperfx.fold_program(program, untie_shared=True, verify=False)  # checked below, on new shapes

    tapered = taper_layer_names(model)
    assert {f.name for f in report.folded} == tapered
    assert not tapered & computing_layers(folded), "a folded norm still computes something"
    assert all(s.name not in tapered for s in report.skipped)
    other_shape = torch.randint(0, VOCAB, (3, 7), generator=g)  # dynamic batch and sequence
    check = taperfx.verify(program, folded, (other_shape,))
    assert check.ok, str(check)


@pytest.mark.parametrize("ln", [False, True])
def test_fold_matches_the_eager_model_and_fold_module(ln):
    g = torch.Generator().manual_seed(1)
    model = Stack(vocab=VOCAB, width=12, layers=2, ln=ln, fused_qkv=ln, swiglu=not ln, bias=ln, tied=False)
    ids = torch.randint(0, VOCAB, (2, 5), generator=g)
    model = gate_zero(model, "all", ids, g)
    with torch.no_grad():
        program = taperfx.fold(torch.export.export(model, (ids,)), strict=True)
        eager, report = taperfx.fold_module(model, (ids,), strict=True)
        want = model(ids)
        torch.testing.assert_close(program.module()(ids), want, rtol=0, atol=1e-5 * want.abs().max().item())
        torch.testing.assert_close(eager(ids), want, rtol=0, atol=1e-5 * want.abs().max().item())
    assert not any(isinstance(m, taperfx.TaperNorm) for m in eager.modules())
    assert {f.name for f in report.folded} == taper_layer_names(model)
