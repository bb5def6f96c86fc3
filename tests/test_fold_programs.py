"""The folded program is a valid program: reference models, save/load, unflatten, GraphModule, Conv1D."""

import pytest
import torch
from torch import nn
from torch.export import Dim
from torch.fx.experimental.proxy_tensor import make_fx

import taperfx
from taperfx.models import ModelConfig, build_model

from helpers.tapering import taper_to


def _reference(arch: str, mode: str):
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch=arch, vocab_size=61, dim=24, n_layers=2, n_heads=2, max_seq_len=32))
    taperfx.convert(model, mode)
    ids = torch.randint(0, 61, (2, 6))
    taper_to(model, ids)
    with torch.no_grad():
        program = torch.export.export(model, (ids,), dynamic_shapes=({0: Dim("batch"), 1: Dim("seq", max=32)},))
    return model, program, ids


@pytest.mark.slow  # exports and verifies whole models (5-20 s)
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_reference_models_fold_into_a_valid_program(arch, tmp_path):
    model, program, ids = _reference(arch, "internal")
    before = {k: v.clone() for k, v in program.state_dict.items()}
    folded, report = taperfx.fold_program(program, verify=True)

    assert len(report.folded) == 2 * model.config.n_layers and [s.name for s in report.skipped] == ["norm"]
    assert report.bytes_saved > 0 and report.seconds > 0 and "folded 4 norm(s)" in str(report)
    assert all(torch.equal(v, program.state_dict[k]) for k, v in before.items()), "the input program changed"
    assert any(n.target is torch.ops.aten.mul.Tensor for n in program.graph.nodes)

    other = torch.randint(0, 61, (3, 9))
    want = model(other)[0]
    for candidate in (folded, folded.run_decompositions()):
        torch.testing.assert_close(candidate.module()(other)[0], want, rtol=0, atol=1e-5 * want.abs().max().item())
    torch.export.save(folded, tmp_path / "folded.pt2")
    loaded = torch.export.load(tmp_path / "folded.pt2")
    torch.testing.assert_close(loaded.module()(other)[0], folded.module()(other)[0], rtol=0, atol=0)
    unflat = torch.export.unflatten(folded)
    torch.testing.assert_close(unflat(other)[0], folded.module()(other)[0], rtol=0, atol=0)
    unused = [n.name for n in folded.graph.nodes if n.op == "placeholder" and not n.users and n.name != "input_ids"]
    assert unused == [], "dead parameter placeholders left behind"

    again, second = taperfx.fold_program(folded)
    assert second.folded == [] and set(again.state_dict) == set(folded.state_dict)
    torch.testing.assert_close(again.module()(other)[0], folded.module()(other)[0], rtol=0, atol=0)


@pytest.mark.slow  # exports and verifies whole models (5-20 s)
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_all_taper_reference_models_fold_completely_when_untied(arch):
    model, program, ids = _reference(arch, "all")
    folded, report = taperfx.fold_program(program, strict=True, untie_shared=True, verify=True)
    assert len(report.folded) == 2 * model.config.n_layers + 1
    eager, eager_report = taperfx.fold_module(model, (ids,), untie_shared=True, strict=True)
    want = model(ids)[0]
    torch.testing.assert_close(eager(ids)[0], want, rtol=0, atol=1e-5 * want.abs().max().item())
    assert not any(isinstance(m, taperfx.TaperNorm) for m in eager.modules())


@pytest.mark.slow  # exports and verifies whole models (5-20 s)
def test_graph_module_with_get_attr_weights():
    model, program, ids = _reference("gpt2", "internal")
    module = program.run_decompositions().module()  # parameters are get_attr attributes here
    folded, report = taperfx.fold_graph_module(module)
    assert len(report.folded) == 4
    assert not any(n.op == "get_attr" and "ln_" in n.target for n in folded.graph.nodes)
    want = model(ids)[0]
    torch.testing.assert_close(folded(ids)[0], want, rtol=0, atol=1e-5 * want.abs().max().item())
    torch.testing.assert_close(module(ids)[0], want, rtol=0, atol=1e-5 * want.abs().max().item())


def test_a_real_mode_make_fx_graph_folds():
    """``make_fx(model)(x)`` gives each ``get_attr`` value its own fake mode; the fold's new values take one."""
    torch.manual_seed(3)
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    model = nn.Sequential(nn.LayerNorm(16), nn.Linear(16, 32), nn.GELU(), nn.RMSNorm(32), nn.Linear(32, 4))
    model = taper_to(taperfx.convert(model.double(), "all"), x)
    with torch.no_grad():
        for norm in taperfx.tapernorms(model):
            norm.weight_tilde.normal_(1.0, 0.3)
        module = make_fx(model)(x)
        folded, report = taperfx.fold_graph_module(module, strict=True)
        other = torch.randn(2, 7, 16, dtype=torch.float64)[:, :5]
        torch.testing.assert_close(folded(other), model(other), rtol=1e-12, atol=1e-12)
    assert len(report.folded) == 2 and report.layers_checked == 2


def test_conv1d_weight_stored_in_by_out():
    conv1d = pytest.importorskip("transformers.pytorch_utils").Conv1D

    class HFBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln = taperfx.TaperLayerNorm(10)
            self.c_attn = conv1d(30, 10)  # (nf=out, nx=in); weight stored (in, out)

        def forward(self, x):
            return self.c_attn(self.ln(x))

    model = HFBlock()
    with torch.no_grad():
        model.c_attn.weight.normal_()
        model.c_attn.bias.normal_()
        model.ln.bias.normal_()
    x = torch.randn(2, 5, 10)
    taper_to(model, x)
    with torch.no_grad():
        program = torch.export.export(model, (x,))
    for candidate in (program, program.run_decompositions()):
        folded, report = taperfx.fold_program(candidate, strict=True, verify=True)
        assert [f.weights for f in report.folded] == [("c_attn.weight",)]
    eager, _ = taperfx.fold_module(model, (x,), strict=True)
    torch.testing.assert_close(eager(x), model(x), rtol=0, atol=1e-5 * model(x).abs().max().item())
