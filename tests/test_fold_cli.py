"""``taperfx fold CHECKPOINT -o OUT.pt2`` end to end on a tiny gate-zero checkpoint."""

import pytest
import torch

import taperfx
from taperfx.cli import main
from taperfx.models import ModelConfig, build_model
from taperfx.train.checkpoint import save_checkpoint

from helpers.tapering import taper_to


@pytest.mark.slow  # exports, folds and saves a program (about 8 s)
def test_fold_command_writes_a_loadable_folded_program(tmp_path, capsys):
    torch.manual_seed(0)
    config = ModelConfig(arch="llama", vocab_size=40, dim=16, n_layers=1, n_heads=2, max_seq_len=16)
    model = taperfx.convert(build_model(config), "internal")
    ids = torch.randint(0, 40, (2, 5))
    taper_to(model, ids)
    tokenizer = tmp_path / "tokenizer.txt"  # not .model: fold -o X.pt2 records a stand-in's bytes, not pieces
    tokenizer.write_bytes(b"stand-in")
    ckpt = save_checkpoint(tmp_path / "run", 1, model, {"protocol": "internal", "model": config.to_dict()}, tokenizer)
    out = tmp_path / "folded.pt2"

    assert main(["fold", str(ckpt), "-o", str(out)]) == 0

    printed = capsys.readouterr().out
    assert printed.startswith("folded 2 norm(s), kept 1;") and str(out) in printed
    program = torch.export.load(out)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left over
    positions = torch.arange(5).expand(2, 5)
    logits, _ = program.module()(ids, positions, model.empty_cache(2))
    want, _ = model(ids)
    torch.testing.assert_close(logits, want, rtol=0, atol=1e-5 * want.abs().max().item())
    assert main(["fold", str(tmp_path / "missing"), "-o", str(out)]) == 2
