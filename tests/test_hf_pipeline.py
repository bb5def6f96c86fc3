"""A local Hugging Face checkpoint end to end: tokenize, fine-tune through the taper, fold, save, reload, eval."""

import json

import pytest
import torch
from torch import nn

import taperfx
from taperfx.cli import main
from taperfx.hf import IDENTITY_NORMS_KEY, HFCausalLM, load_folded, prepare_text, save_folded
from taperfx.train.checkpoint import load_model
from taperfx.train.tokens import open_data

from helpers.hf_tiny import save_checkpoint_dir, transformers

TAPERED = {"gpt2": ("ln_1", "ln_2"), "llama": ("input_layernorm", "post_attention_layernorm")}
EVAL = ["--context", "16", "--batch-size", "4", "--batches", "3"]


def run_cli(capsys, *argv):
    assert main([str(a) for a in argv]) == 0
    return capsys.readouterr().out


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def finetuned(request, tmp_path_factory):
    """(arch, source dir, data dir, run dir) after `taperfx train --init-from hf:` through the whole schedule."""
    root = tmp_path_factory.mktemp(request.param)
    source = save_checkpoint_dir(request.param, root / "model")
    data = prepare_text(source, [root / "corpus.txt"], root / "data", val_fraction=0.1)
    overrides = [
        "batch_size=2",
        "batch_tokens=64",
        "context=16",
        "taper_start=2",
        "taper_end=5",
        "eval_interval=3",
        "checkpoint_interval=3",
        "eval_batches=2",
        "log_interval=1",
        "progress=false",
        "lr=3e-3",
    ]
    argv = [
        "train",
        "--init-from",
        f"hf:{source}",
        "--data",
        data,
        "--out",
        root / "run",
        "--steps",
        "6",
        "--protocol",
        "internal",
        "--device",
        "cpu",
    ]
    assert main([str(a) for a in argv] + [x for o in overrides for x in ("--set", o)]) == 0
    return request.param, source, data, root / "run"


def test_prepared_text_uses_the_checkpoints_tokenizer(finetuned):
    _, source, data, _ = finetuned
    prepared = open_data(data)
    tokenizer = transformers.AutoTokenizer.from_pretrained(source)
    stream = prepared.stream("train", 8).tokens
    first = tokenizer((source.parent / "corpus.txt").read_text().splitlines()[1])["input_ids"]
    assert list(stream[: len(first) + 1]) == [*first, tokenizer.eos_token_id]  # line 0 is held out
    assert prepared.tokenizer_path.name == "tokenizer.json" and prepared.vocab_size == len(tokenizer)


def test_finetune_runs_the_taper_to_gate_zero(finetuned):
    arch, _, _, run = finetuned
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    gates = [r["gate"] for r in records if not r.get("final")]
    schedule = taperfx.GateSchedule(2, 5)
    assert gates == [schedule(s) for s in range(6)]
    assert all(r["scale_target"] is None for r in records[:2]) and records[5]["scale_target"] > 0
    model, meta = load_model(run)
    assert isinstance(model, HFCausalLM) and meta["gate_zero"] and meta["tokenizer"] == "tokenizer.json"
    norms = list(taperfx.tapernorms(model))
    assert len(norms) == 4 and all(n.gate_value == 0.0 and n.c.item() != 1.0 for n in norms)
    # batch_tokens=64 over 2 × 16-token sequences: 2 micro-batches per step, seen by calibration on 2 steps at g = 1.
    assert meta["train"]["grad_accum"] == 2 and all(int(n.ema_steps) == 4 for n in norms)


def test_folded_checkpoint_loads_into_the_stock_class(finetuned, tmp_path):
    arch, source, _, run = finetuned
    model, _ = load_model(run)
    report = save_folded(model, tmp_path / "folded", tokenizer_from=source)
    config = json.loads((tmp_path / "folded" / "config.json").read_text())
    assert sorted(config[IDENTITY_NORMS_KEY]) == sorted(f.name for f in report.folded)
    back = load_folded(tmp_path / "folded")
    stock = type(model.hf)
    assert type(back) is stock
    names = [name for name, _ in back.named_modules() if name.rpartition(".")[2] in TAPERED[arch]]
    assert len(names) == 4 and all(isinstance(back.get_submodule(n), nn.Identity) for n in names)
    assert not any(k.rpartition(".")[0] in names for k in back.state_dict())
    tokens = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(back(tokens).logits, model(tokens)[0], rtol=1e-5, atol=1e-5)


def test_load_folded_refuses_weights_that_do_not_fit(finetuned, tmp_path):
    _, _, _, run = finetuned
    model, _ = load_model(run)
    save_folded(model, tmp_path / "folded")
    config_file = tmp_path / "folded" / "config.json"
    config = json.loads(config_file.read_text())
    config[IDENTITY_NORMS_KEY] = config[IDENTITY_NORMS_KEY][1:]  # one folded norm no longer declared
    config_file.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="missing"):
        load_folded(tmp_path / "folded")
    with pytest.raises(ValueError, match="not empty"):
        save_folded(model, tmp_path / "folded")


def test_eval_compares_source_tapered_and_folded_by_one_command(finetuned, tmp_path, capsys):
    _, source, data, run = finetuned
    folded = tmp_path / "folded"
    run_cli(capsys, "export", "hf", run, "--out", folded)
    results = {
        name: json.loads(run_cli(capsys, "eval", path, "--data", data, *EVAL).strip().splitlines()[-1])
        for name, path in (("source", source), ("tapered", run), ("folded", folded))
    }
    assert results["tapered"]["gate"] == 0.0
    assert results["folded"]["cross_entropy"] == pytest.approx(results["tapered"]["cross_entropy"], rel=1e-5)
    assert results["source"]["cross_entropy"] != pytest.approx(results["tapered"]["cross_entropy"], rel=1e-3)
