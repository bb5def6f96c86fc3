"""``fold_checkpoint``: plan on a meta model, stream the shards, load the result, compare logits."""

import json

import pytest
import safetensors.torch
import torch

import taperfx
from taperfx.checkpoint_fold import fold_checkpoint, load_folded_checkpoint, plan_checkpoint
from taperfx.models import ModelConfig, build_model
from taperfx.passes.fold_plan import FoldPlan
from taperfx.passes.shards import INDEX_FILE, SINGLE_FILE, ShardReader, checkpoint_files
from taperfx.train.checkpoint import save_checkpoint

from helpers.tapering import taper_to


def _reshard(ckpt, parts: int = 2) -> None:
    """Split ``model.safetensors`` into ``parts`` shards with an index, as Hugging Face lays out large models."""
    state = safetensors.torch.load_file(ckpt / SINGLE_FILE)
    keys = sorted(state)
    weight_map = {}
    for i in range(parts):
        name = f"model-{i + 1:05d}-of-{parts:05d}.safetensors"
        chunk = {k: state[k] for k in keys[i::parts]}
        safetensors.torch.save_file(chunk, ckpt / name)
        weight_map.update(dict.fromkeys(chunk, name))
    (ckpt / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (ckpt / SINGLE_FILE).unlink()


def _run(tmp_path, arch: str, protocol: str, *, gate: float = 0.0):
    torch.manual_seed(0)
    config = ModelConfig(arch=arch, vocab_size=40, dim=16, n_layers=2, n_heads=2, max_seq_len=16)
    model = taperfx.convert(build_model(config), protocol)
    ids = torch.randint(0, 40, (2, 5))
    taper_to(model, ids, gate=gate)
    tokenizer = tmp_path / "tokenizer.model"
    tokenizer.write_bytes(b"stand-in: the fold never reads it")
    meta = {"protocol": protocol, "model": config.to_dict()}
    return model, ids, save_checkpoint(tmp_path / f"run-{arch}", 1, model, meta, tokenizer)


def test_all_taper_gpt2_run_sharded_folds_completely_and_matches_logits(tmp_path):
    model, ids, ckpt = _run(tmp_path, "gpt2", "all")
    _reshard(ckpt)
    result = fold_checkpoint(ckpt, tmp_path / "folded", progress=False)

    assert [f.name for f in result.report.folded] == [
        "layers.0.ln_1",
        "layers.0.ln_2",
        "layers.1.ln_1",
        "layers.1.ln_2",
        "norm",
    ]
    assert result.checks and all(c.ok for c in result.checks)
    files = checkpoint_files(result.out)
    assert set(files.values()) == {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"}
    assert not any(k.startswith(("layers.0.ln_1.", "norm.")) for k in files)
    record = json.loads((result.out / "config.json").read_text())["folded"]
    assert record == {
        "identity_norms": ["layers.0.ln_1", "layers.0.ln_2", "layers.1.ln_1", "layers.1.ln_2", "norm"],
        "untied": ["output"],  # the head was tied to wte: it gets a folded copy, wte stays
        "added_biases": ["output"],  # W β of the final TaperLN
    }
    folded = load_folded_checkpoint(result.out)
    assert not any(isinstance(m, taperfx.TaperNorm) for m in folded.modules())
    want, _ = model(ids)
    got, _ = folded(ids)
    torch.testing.assert_close(got, want, rtol=0, atol=2e-6 * want.abs().max().item())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".folded")]


def test_internal_llama_run_keeps_the_final_norm_and_its_state(tmp_path):
    model, ids, ckpt = _run(tmp_path, "llama", "internal")
    result = fold_checkpoint(ckpt, tmp_path / "folded", progress=False)
    assert [m.name for m in result.plan.maps] == [
        "layers.0.attention_norm",
        "layers.0.ffn_norm",
        "layers.1.attention_norm",
        "layers.1.ffn_norm",
    ]
    assert {s.name for s in result.report.skipped} == {"norm"}
    assert FoldPlan.from_json(result.plan.to_json()) == result.plan
    assert "norm.weight" in result.plan.keys and not result.plan.biases  # RMS: no shift, no bias
    want, _ = model(ids)
    got, _ = load_folded_checkpoint(result.out)(ids)
    torch.testing.assert_close(got, want, rtol=0, atol=2e-6 * want.abs().max().item())


def test_refuses_a_gate_above_zero_and_a_used_output_directory(tmp_path):
    _, _, ckpt = _run(tmp_path, "llama", "internal", gate=0.5)
    with pytest.raises(ValueError, match="gate"):
        fold_checkpoint(ckpt, tmp_path / "folded", progress=False)
    used = tmp_path / "used"
    used.mkdir()
    (used / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="not an empty directory"):
        fold_checkpoint(ckpt, used, progress=False)
    assert (used / "keep.txt").read_text() == "x"
    with pytest.raises(ValueError, match="either an output directory or in_place"):
        fold_checkpoint(ckpt, progress=False)


def test_spot_check_catches_a_corrupted_folded_weight(tmp_path):
    from taperfx.passes.stream import spot_check, stream_fold

    _, _, ckpt = _run(tmp_path, "gpt2", "all")
    plan = plan_checkpoint(ckpt).plan
    out = tmp_path / "out"
    out.mkdir()
    stream_fold(plan, ckpt, out, progress=False, block_elements=7)  # several blocks per weight
    assert all(c.ok for c in spot_check(plan, ckpt, out, outputs=64))
    target = plan.weights[0].target
    with ShardReader(out / checkpoint_files(out)[target], writable=True) as shard:
        shard.view(target)[:, 3] *= 1.001  # one input feature off by 0.1 %: one column of every output row
        shard.flush()
    checks = {c.weight: c for c in spot_check(plan, ckpt, out, outputs=64)}
    assert not checks[target].ok and checks[target].max_error > 10 * checks[target].tolerance


@pytest.mark.parametrize("arch, protocol", [("gpt2", "all"), ("llama", "internal")])
def test_run_of_a_transformers_model_folds_into_a_directory_load_folded_reads(tmp_path, arch, protocol):
    from taperfx.hf import HFCausalLM, HFSource, load_folded

    from helpers.hf_tiny import hf_model

    hf = hf_model(arch)
    model = taperfx.convert(HFCausalLM(hf), protocol)
    ids = torch.randint(0, 100, (2, 5))
    taper_to(model, ids)
    tokenizer = tmp_path / "tokenizer.json"
    tokenizer.write_text("{}")
    meta = {"protocol": protocol, "model": HFSource(tmp_path / "unused", hf.config.to_dict()).to_dict()}
    ckpt = save_checkpoint(tmp_path / "run", 1, model, meta, tokenizer)

    result = fold_checkpoint(ckpt, tmp_path / "folded", progress=False)

    config = json.loads((result.out / "config.json").read_text())
    if arch == "gpt2":  # All-Taper: ln_f folds into a copy of the tied head, which gets a bias W β
        assert config["taperfx_added_biases"] == ["lm_head"] and config["tie_word_embeddings"] is False
        assert len(config["taperfx_identity_norms"]) == 5
    else:  # Internal: the final norm is a real RMSNorm the stock class holds
        assert config["taperfx_added_biases"] == [] and "model.norm" not in config["taperfx_identity_norms"]
        assert len(config["taperfx_identity_norms"]) == 4
    assert not any(k.startswith("hf.") for k in checkpoint_files(result.out))
    want, _ = model(ids)
    got = load_folded(result.out)(ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=2e-6 * want.abs().max().item())


def test_in_place_fold_of_a_run_loads_folded_and_refuses_a_second_fold(tmp_path):
    from taperfx.passes.journal import has_journal
    from taperfx.train.checkpoint import load_model

    model, ids, ckpt = _run(tmp_path, "gpt2", "internal")
    size_before = {p.name: p.stat().st_size for p in ckpt.iterdir()}

    result = fold_checkpoint(ckpt, in_place=True, progress=False)

    assert result.out == ckpt and not has_journal(ckpt)
    assert (ckpt / SINGLE_FILE).stat().st_size == size_before[SINGLE_FILE]  # rewritten inside the file
    assert len(result.plan.maps) == 4 and result.stats.folded_bytes > 0
    want, _ = model(ids)
    got, _ = load_folded_checkpoint(ckpt)(ids)
    torch.testing.assert_close(got, want, rtol=0, atol=2e-6 * want.abs().max().item())
    with pytest.raises(ValueError, match="already folded"):
        fold_checkpoint(ckpt, in_place=True, progress=False)
    with pytest.raises(ValueError, match="folded"):
        load_model(ckpt)  # the norms would run a second time on folded weights


@pytest.mark.parametrize("in_place", [False, True])
def test_transformers_directory_with_taper_state_folds_sharded(tmp_path, in_place):
    from taperfx.hf import HFCausalLM, load_folded

    from helpers.hf_tiny import hf_model

    model = taperfx.convert(HFCausalLM(hf_model("gpt2")), "all")
    ids = torch.randint(0, 100, (2, 5))
    taper_to(model, ids)
    source = tmp_path / "tapered"
    model.hf.save_pretrained(source, max_shard_size="20KB")  # TaperNorm state included, 8 shards
    (source / "tokenizer.json").write_text("{}")

    result = fold_checkpoint(source, None if in_place else tmp_path / "folded", in_place=in_place, progress=False)

    assert result.hf and result.out == (source if in_place else tmp_path / "folded")
    config = json.loads((result.out / "config.json").read_text())
    assert config["taperfx_added_biases"] == ["lm_head"] and len(config["taperfx_identity_norms"]) == 5
    assert (result.out / "tokenizer.json").is_file()
    want, _ = model(ids)
    got = load_folded(result.out)(ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=2e-6 * want.abs().max().item())


def test_fold_command_streams_into_a_directory_or_in_place(tmp_path, capsys):
    from taperfx.cli import main

    model, ids, ckpt = _run(tmp_path, "llama", "internal")
    out = tmp_path / "folded"

    assert main(["fold", str(ckpt), "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "spot check: 3 folded layer(s)" in printed
    want, _ = model(ids)
    torch.testing.assert_close(load_folded_checkpoint(out)(ids)[0], want, rtol=0, atol=2e-6 * want.abs().max().item())

    assert main(["fold", str(ckpt), "-o", str(out)]) == 2  # not empty: never written into
    assert main(["fold", str(ckpt), "--in-place", "-o", str(tmp_path / "x")]) == 2
    assert main(["fold", str(ckpt), "-o", str(tmp_path / "y"), "--strict"]) == 2
    assert main(["fold", str(ckpt)]) == 2
    assert main(["fold", str(ckpt), "--in-place"]) == 0
    torch.testing.assert_close(load_folded_checkpoint(ckpt)(ids)[0], want, rtol=0, atol=2e-6 * want.abs().max().item())
    errors = capsys.readouterr().err
    assert "error[output-exists]" in errors and "error[fold-output]" in errors and "error[fold-option]" in errors
    for again in (["--in-place"], ["-o", str(tmp_path / "z")]):  # a folded checkpoint has nothing left to fold
        assert main(["fold", str(ckpt), *again]) == 2
        assert "error[already-folded]" in capsys.readouterr().err
    assert main(["fold", str(ckpt), "-o", str(tmp_path / "z.pt2")]) == 2  # its norms would run on folded weights
    assert "error[checkpoint-folded]" in capsys.readouterr().err
    assert not (tmp_path / "z").exists() and not (tmp_path / "z.pt2").exists()


@pytest.mark.parametrize("damage", ["truncated shard", "missing shard", "weight_map not a table"])
def test_a_damaged_checkpoint_is_bad_data_for_the_streamed_fold_and_nothing_is_written(tmp_path, capsys, damage):
    """Damage is the checkpoint's (exit 3, ``bad-checkpoint``) whichever way it is folded; no output directory
    appears, and an in-place fold leaves the files as they were (no journal)."""
    from taperfx.cli import main
    from taperfx.passes.journal import has_journal

    _, _, ckpt = _run(tmp_path, "llama", "internal")
    _reshard(ckpt)
    shard = ckpt / "model-00002-of-00002.safetensors"
    if damage == "truncated shard":
        shard.write_bytes(shard.read_bytes()[:-8])
    elif damage == "missing shard":
        shard.unlink()
    else:
        (ckpt / INDEX_FILE).write_text('{"weight_map": 5}')
    before = {p.name: p.read_bytes() for p in ckpt.iterdir() if p.is_file()}

    assert main(["fold", str(ckpt), "-o", str(tmp_path / "folded")]) == 3
    assert main(["fold", str(ckpt), "--in-place"]) == 3

    errors = capsys.readouterr().err.splitlines()
    assert [line.split("error[")[1].split("]")[0] for line in errors] == ["bad-checkpoint", "bad-checkpoint"]
    assert not (tmp_path / "folded").exists() and not has_journal(ckpt)
    assert {p.name: p.read_bytes() for p in ckpt.iterdir() if p.is_file()} == before
