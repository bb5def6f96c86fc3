"""convert() on models it did not create, and the outside-the-loop API."""

import pytest
import torch
from torch import nn

import taperfx
from taperfx import TaperLayerNorm, TaperRMSNorm


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
    """Looks like an RMSNorm (weight + eps) but scales by 1 + weight: must not be converted."""

    def forward(self, x):
        return super().forward(x) / self.weight * (1 + self.weight)


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


@pytest.mark.parametrize(
    "norm_cls, taper_cls",
    [
        (ForeignRMSNorm, TaperRMSNorm),
        (lambda d: nn.RMSNorm(d, eps=1e-6), TaperRMSNorm),
        (nn.LayerNorm, TaperLayerNorm),
    ],
)
@pytest.mark.parametrize("mode", ["internal", "all"])
def test_convert_foreign_model_keeps_outputs(norm_cls, taper_cls, mode):
    torch.manual_seed(0)
    model = TinyLM(norm_cls).eval()
    ids = torch.randint(0, 30, (2, 7))
    before = model(ids)
    assert taperfx.convert(model, mode) is model
    converted = [n for n, m in model.named_modules() if isinstance(m, taper_cls)]
    internal = [f"blocks.{i}.norm" for i in range(3)]
    assert converted == (internal if mode == "internal" else internal + ["ln_f"])
    assert taperfx.find_final_norm(model) == "ln_f"
    torch.testing.assert_close(model(ids), before, rtol=1e-6, atol=1e-6)


def test_lookalike_norm_with_other_maths_is_left_alone():
    model = TinyLM(OffsetRMSNorm)
    with pytest.raises(ValueError, match="no normalization layer"):
        taperfx.convert(model)


def test_explicit_final_norm_and_errors():
    model = TinyLM(nn.LayerNorm)
    taperfx.convert(model, "internal", final_norm="blocks.2.norm")
    assert isinstance(model.ln_f, TaperLayerNorm) and isinstance(model.blocks[2]["norm"], nn.LayerNorm)
    with pytest.raises(ValueError, match="mode must be one of"):
        taperfx.convert(TinyLM(nn.LayerNorm), "some")
    with pytest.raises(ValueError, match="not a submodule"):
        taperfx.convert(TinyLM(nn.LayerNorm), final_norm="nope")
    with pytest.raises(ValueError, match="no normalization layer"):
        taperfx.convert(nn.Sequential(nn.Linear(3, 3)))
    with pytest.raises(ValueError, match="no TaperNorm"):
        taperfx.set_gate(nn.Linear(3, 3), 0.0)


def test_calibrate_then_taper_from_outside_a_training_loop():
    """The documented flow: convert a trained model, calibrate on a few batches, start the taper, set g = 0."""
    torch.manual_seed(0)
    model = taperfx.convert(TinyLM(ForeignRMSNorm), "internal")
    ids = torch.randint(0, 30, (4, 9))
    model.train()
    for _ in range(3):
        model(ids)
    taperfx.start_taper(model)
    taperfx.set_gate(model, 0.0)
    norms = list(taperfx.tapernorms(model))
    assert len(norms) == 3 and all(m.gate_value == 0.0 and m.c.item() > 0 for m in norms)
    assert all(torch.equal(m.weight_tilde, m.weight) for m in norms)
    assert torch.isfinite(model.eval()(ids)).all()


def test_convert_transformers_llama_rmsnorm():
    pytest.importorskip("transformers", reason="the hf extra is not installed")
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    model = TinyLM(lambda d: LlamaRMSNorm(d, eps=1e-6))
    ids = torch.randint(0, 30, (2, 5))
    before = model(ids)
    taperfx.convert(model, "all")
    assert sum(isinstance(m, TaperRMSNorm) for m in model.modules()) == 4
    torch.testing.assert_close(model(ids), before, rtol=1e-5, atol=1e-5)
