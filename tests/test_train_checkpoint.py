"""Checkpoint directories: round trip of a tapered model, keep-last-N-plus-best, atomic writes."""

import pytest
import torch

import taperfx
from taperfx.models import ModelConfig, build_model
from taperfx.train.checkpoint import list_checkpoints, load_model, prune_checkpoints, save_checkpoint

from helpers.tapering import taper_to

CONFIG = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, max_seq_len=16)


@pytest.fixture
def tapered(tmp_path):
    torch.manual_seed(0)
    model = taper_to(taperfx.convert(build_model(CONFIG), "all"), torch.randint(0, 64, (2, 16)))
    tokenizer = tmp_path / "tokenizer.model"
    tokenizer.write_bytes(b"sentencepiece model bytes")
    return model, tokenizer


def meta(val_loss=None):
    return {"model": CONFIG.to_dict(), "protocol": "all", "final": False, "val_loss": val_loss, "train": {}}


def test_round_trip_restores_gate_calibration_and_tied_weights(tapered, tmp_path):
    model, tokenizer = tapered
    path = save_checkpoint(tmp_path / "run", 7, model, meta(), tokenizer)
    loaded, info = load_model(path)
    assert info["gate_zero"] and info["step"] == 7 and info["tokenizer_path"].endswith("tokenizer.model")
    assert loaded.output.weight is loaded.tok_embeddings.weight
    for a, b in zip(taperfx.tapernorms(model), taperfx.tapernorms(loaded)):
        assert b.gate_value == 0.0 and torch.equal(a.c, b.c) and torch.equal(a.weight_tilde, b.weight_tilde)
    ids = torch.randint(0, 64, (1, 16))
    model.eval()
    assert torch.equal(model(ids)[0], loaded(ids)[0])
    assert load_model(tmp_path / "run")[1]["path"] == str(path)  # a run directory resolves to its latest


def test_prune_keeps_the_last_n_and_the_best(tapered, tmp_path):
    model, tokenizer = tapered
    for step, val in [(1, float("nan")), (2, 1.0), (3, 2.5), (4, 2.0), (5, None)]:
        save_checkpoint(tmp_path, step, model, meta(val), tokenizer)
    prune_checkpoints(tmp_path, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-0000002", "step-0000004", "step-0000005"]


def test_a_failed_save_leaves_no_partial_directory(tapered, tmp_path):
    model, tokenizer = tapered
    save_checkpoint(tmp_path, 1, model, meta(), tokenizer)
    with pytest.raises(TypeError):
        save_checkpoint(tmp_path, 2, model, {**meta(), "val_loss": object()}, tokenizer)  # not JSON-serializable
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-0000001"]
