"""All-Taper Hugging Face models fold completely, final norm included, and ``taperfx export hf`` writes them.

The final norm reaches the head through a shape-preserving ``view`` (GPT-2) or a
full-range slice (Llama's ``logits_to_keep``): the fold passes through both.
"""

import json

import pytest
import torch
from torch import nn

import taperfx
from taperfx.cli import main
from taperfx.hf import HFSource, load_folded
from taperfx.hf.folded import ADDED_BIASES_KEY
from taperfx.train.checkpoint import save_checkpoint

from helpers.hf_tiny import VOCAB, save_checkpoint_dir

FINAL = {"gpt2": "transformer.ln_f", "llama": "model.norm"}


def _ids(seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=sorted(FINAL))
def all_tapered(request, tmp_path_factory):
    """(arch, source dir, model): a stock checkpoint converted in All mode, calibrated, at g = 0."""
    source = save_checkpoint_dir(request.param, tmp_path_factory.mktemp(request.param) / "model")
    model = taperfx.convert(HFSource.from_directory(source).build(), "all")
    with torch.no_grad():  # a fresh GPT-2 has β = 0, which would hide a lost head bias W β
        for norm in taperfx.tapernorms(model):
            if getattr(norm, "bias", None) is not None:
                norm.bias.normal_(generator=torch.Generator().manual_seed(2))
    taperfx.calibrate(model, [_ids(1)])
    taperfx.set_gate(model, 0.0)
    return request.param, source, model.eval()


def test_every_tapered_norm_folds_including_the_final_one(all_tapered):
    arch, _, model = all_tapered
    with torch.no_grad():
        program = torch.export.export(model, (_ids(0),), strict=False)
    folded, report = taperfx.fold_program(program, strict=True, untie_shared=True, verify=True)
    tapered = {f"hf.{name}" for name, m in model.hf.named_modules() if isinstance(m, taperfx.TaperNorm)}
    assert f"hf.{FINAL[arch]}" in tapered and {f.name for f in report.folded} == tapered
    torch.testing.assert_close(folded.module()(_ids(2))[0], model(_ids(2))[0], rtol=1e-5, atol=1e-5)


def test_export_hf_writes_an_all_taper_checkpoint(all_tapered, tmp_path, capsys):
    arch, source, model = all_tapered
    meta = {"protocol": "all", "model": HFSource.from_directory(source).to_dict()}
    checkpoint = save_checkpoint(tmp_path / "run", 1, model, meta, source / "tokenizer.json")

    assert main(["export", "hf", str(checkpoint), "--out", str(tmp_path / "folded")]) == 0

    assert f"folded  {FINAL[arch]} " in capsys.readouterr().out
    config = json.loads((tmp_path / "folded" / "config.json").read_text())
    assert config[ADDED_BIASES_KEY] == (["lm_head"] if arch == "gpt2" else [])  # TaperLN's W β; RMS adds none
    back = load_folded(tmp_path / "folded")
    assert isinstance(back.get_submodule(FINAL[arch]), nn.Identity)
    with torch.no_grad():
        torch.testing.assert_close(back(_ids(3)).logits, model(_ids(3))[0], rtol=1e-5, atol=1e-5)
