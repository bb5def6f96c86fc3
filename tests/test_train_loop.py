"""The training loop on a tiny model: schedule and calibration, resume, divergence, clear errors."""

import json
import shutil

import pytest
import torch

import taperfx
from taperfx.errors import BadInput
from taperfx.train.checkpoint import list_checkpoints, load_model, load_trainer_state, read_meta
from taperfx.train.config import load_config
from taperfx.train.loop import Trainer, TrainingDiverged, lr_factor, train
from taperfx.train.prepare import prepare_data

from helpers.tiny_runs import tiny_config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return prepare_data(tmp_path_factory.mktemp("data") / "d", n_stories=200, vocab_size=320)


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_trainer_drives_schedule_calibration_and_ends_at_gate_zero(data_dir, tmp_path):
    config = tiny_config(
        data_dir,
        tmp_path / "run",
        "protocol='internal'",
        "steps=12",
        "taper_start=3",
        "taper_end=9",
        "grad_accum=2",
        "eval_interval=4",
        "checkpoint_interval=4",
    )
    final = train(config)
    schedule = taperfx.GateSchedule(3, 9)
    steps = [r for r in records(tmp_path / "run") if not r.get("final")]
    assert [r["gate"] for r in steps] == [schedule(s) for s in range(12)]
    assert [r["lr"] for r in steps] == pytest.approx([1e-3 * lr_factor(s, 0, 12) for s in range(12)])

    model, meta = load_model(final)
    assert meta["final"] and meta["gate_zero"] and meta["gate"] == 0.0 and meta["step"] == 12
    for norm in taperfx.tapernorms(model):
        # Observed only on the 3 steps × 2 micro-batches at g = 1, then frozen into c.
        assert int(norm.ema_steps) == 6
        assert norm.c.item() == pytest.approx(norm.calibrated_c.item(), rel=1e-6)
        assert norm.c.item() != 1.0
    assert not isinstance(model.norm, taperfx.TaperNorm)  # internal: the final norm stays a real norm
    intermediate = read_meta(list_checkpoints(tmp_path / "run")[0])
    assert intermediate["step"] == 4 and not intermediate["gate_zero"] and not intermediate["final"]


def test_resume_continues_bit_for_bit(data_dir, tmp_path):
    args = (
        "protocol='all'",
        "scale_loss_weight=0.5",
        "steps=12",
        "eval_interval=4",
        "checkpoint_interval=4",
        "keep_last=3",
    )
    full = train(tiny_config(data_dir, tmp_path / "full", *args))
    # An interrupted run: only the step-4 checkpoint (and its metrics) survived.
    (tmp_path / "cut" / "checkpoints").mkdir(parents=True)
    shutil.copytree(
        tmp_path / "full" / "checkpoints" / "step-0000004", tmp_path / "cut" / "checkpoints" / "step-0000004"
    )
    shutil.copy(tmp_path / "full" / "metrics.jsonl", tmp_path / "cut" / "metrics.jsonl")
    resumed = train(tiny_config(data_dir, tmp_path / "cut", *args), resume=True)

    def without_timing(run):
        return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in records(run)]

    assert without_timing(tmp_path / "cut") == without_timing(tmp_path / "full")
    a, _ = load_model(full)
    b, _ = load_model(resumed)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name


def test_nan_stops_with_the_step_and_keeps_the_last_good_checkpoint(data_dir, tmp_path):
    trainer = Trainer(tiny_config(data_dir, tmp_path / "run", "steps=12", "checkpoint_interval=4", "eval_interval=4"))

    def poison(module, args, output):
        return output * float("nan") if trainer.step == 6 else output

    trainer.model.layers[1].feed_forward.register_forward_hook(poison)
    with pytest.raises(TrainingDiverged, match=r"non-finite loss at step 6 .*step-0000004"):
        trainer.run()
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step-0000004"]
    model, meta = load_model(tmp_path / "run")
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_corrupt_or_truncated_checkpoints_give_clear_errors(data_dir, tmp_path):
    ckpt = train(tiny_config(data_dir, tmp_path / "run", "steps=4", "protocol='all'"))
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match="model.safetensors .*truncated or corrupt"):
        load_model(ckpt)
    (ckpt / "config.json").write_text('{"format": 1, "model": ')
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        load_model(ckpt)
    (ckpt / "trainer_state.pt").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="trainer_state.pt is truncated or corrupt"):
        load_trainer_state(ckpt)


def test_bad_inputs_fail_before_anything_is_written(data_dir, tmp_path):
    no_tokenizer = tmp_path / "no_tokenizer"
    shutil.copytree(data_dir, no_tokenizer)
    (no_tokenizer / "tokenizer.model").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer .* is missing"):
        Trainer(tiny_config(no_tokenizer, tmp_path / "a", "steps=4"))
    with pytest.raises(ValueError, match="fewer than context"):
        Trainer(tiny_config(data_dir, tmp_path / "b", "steps=4", "model.max_seq_len=100000", "context=100000"))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_an_existing_run_needs_resume_and_the_same_settings(data_dir, tmp_path):
    train(tiny_config(data_dir, tmp_path / "run", "steps=4"))
    with pytest.raises(ValueError, match="already holds checkpoints; pass --resume"):
        Trainer(tiny_config(data_dir, tmp_path / "run", "steps=4"))
    with pytest.raises(ValueError, match=r"differs from the checkpoint's in \['lr'\]"):
        Trainer(tiny_config(data_dir, tmp_path / "run", "steps=4", "lr=0.5"), resume=True)


def test_config_overrides_and_validation(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('protocol = "all"\nsteps = 100\n[model]\npreset = "tinystories-128"\n')
    config = load_config(path, ["steps=500", "betas=[0.9, 0.99]", "model.n_layers=2", "data=some/dir"])
    assert (config.protocol, config.steps, config.betas, config.data) == ("all", 500, (0.9, 0.99), "some/dir")
    assert (config.model_config(300).dim, config.model_config(300).n_layers) == (128, 2)
    assert (config.taper_start_step, config.taper_end_step) == (100, 499)  # 100 steps from scratch calibrate c
    with pytest.raises(ValueError, match="unknown training config keys: \\['stpes'\\]"):
        load_config(path, ["stpes=3"])
    with pytest.raises(BadInput) as refused:
        load_config(path, ["protocol=none"])
    assert refused.value.code == "config-choice"
    with pytest.raises(ValueError, match="taper_end"):
        load_config(path, ["steps=500", "taper_end=600"])
