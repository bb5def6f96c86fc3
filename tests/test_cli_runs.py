"""Runs from the command line: locks, config validation, interrupts, full disks, resume, eval and plot (issue 14)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import taperfx
from taperfx.cli import main
from taperfx.locks import LOCK_FILE, hold_directory
from taperfx.train.checkpoint import list_checkpoints, load_model, read_meta

from helpers.tiny_runs import TINY as TINY_RUN
from helpers.tiny_runs import tiny_cli_run, tiny_data

SUBPROCESS_ENV = {**os.environ, "PYTHONPATH": str(Path(taperfx.__file__).parents[1])}
# The loop tests' tiny run, with this file's eval and checkpoint cadence (later settings win).
CADENCE = ("eval_interval=4", "checkpoint_interval=4", "log_interval=2")
TINY = [f"--set={item}" for item in (*TINY_RUN, *CADENCE)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_data(tmp_path_factory)


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    """A finished 8-step Internal-Taper run with checkpoints at steps 4 and 8."""
    return tiny_cli_run(data, tmp_path_factory, 8, *CADENCE)


def train_args(data, out, *extra):
    return ["train", "--data", str(data), "--out", str(out), "--steps", "8", *TINY, *extra]


def error_code(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err  # one line, no traceback
    return err.split("error[", 1)[1].split("]", 1)[0]


@pytest.mark.parametrize(
    "override, code",
    [
        ("lr=abc", "config-type"),
        ("lr=.001", "config-type"),
        ("model.dimm=16", "config-unknown-key"),
        ("model.dim=abc", "config-type"),
        ("betas=0.9", "config-type"),
        ("batch_size=4.5", "config-type"),
        ("steps=20.5", "config-type"),
        ("lr=inf", "config-range"),
        ("model.dim=30", "config-range"),
        ("optimizer.lr=1", "config-unknown-key"),
        ("device=tpu", "config-choice"),
    ],
)
def test_bad_config_values_are_refused_before_anything_is_written(data, tmp_path, capsys, override, code):
    out = tmp_path / "run"
    assert main(train_args(data, out, "--set", override)) == 2
    assert error_code(capsys) == code
    assert not out.exists()


@pytest.mark.parametrize("damage", ["empty val.bin", "truncated train.bin", "bad meta.json"])
def test_damaged_data_is_named(data, tmp_path, capsys, damage):
    copy = shutil.copytree(data, tmp_path / "data")
    name = damage.split()[1]
    if damage.startswith("empty"):
        (copy / name).write_bytes(b"")
    elif damage.startswith("truncated"):
        (copy / name).write_bytes((copy / name).read_bytes()[:-1])
    else:
        (copy / name).write_text('{"dtype": "uint16",')
    assert main(train_args(copy, tmp_path / "run")) == 3
    err = capsys.readouterr().err
    assert str(copy / name) in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_integral_floats_are_integers(data):
    from taperfx.train.config import load_config

    config = load_config(None, ["steps=2e3", "model.dim=64.0"])
    assert config.steps == 2000 and type(config.steps) is int and config.model["dim"] == 64


def test_a_locked_run_directory_refuses_a_second_writer(data, tmp_path, capsys):
    out = tmp_path / "run"
    with hold_directory(out, "test holder"):
        assert main(train_args(data, out)) == 4
        assert error_code(capsys) == "locked"
        assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]  # the refused run wrote nothing
        assert main(["data", "prepare", "--out", str(out), "--stories", "50"]) == 4
    assert not out.exists()  # the holder created it, left nothing in it, and removed it


def test_the_lock_names_a_holder_in_another_process_and_dies_with_it(data, tmp_path, capsys):
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                f"""
                import sys, time
                from taperfx.locks import hold_directory
                with hold_directory({str(out)!r}, "train"):
                    print("held", flush=True)
                    time.sleep(60)
                """
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
        env=SUBPROCESS_ENV,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(train_args(data, out)) == 4
        assert f"pid {holder.pid} on " in capsys.readouterr().err
    finally:
        holder.kill()  # SIGKILL: no cleanup code runs, the kernel drops the flock
        holder.wait()
    with hold_directory(out, "test"):
        pass


def test_interrupted_training_names_the_checkpoint_to_resume_from(data, tmp_path, capsys, monkeypatch):
    from taperfx.train.loop import Trainer

    out = tmp_path / "run"
    step = Trainer.train_step

    def interrupt_at_step_6(self, with_stats):
        if self.step == 6:
            raise KeyboardInterrupt
        return step(self, with_stats)

    monkeypatch.setattr(Trainer, "train_step", interrupt_at_step_6)
    assert main(train_args(data, out)) == 130
    err = capsys.readouterr().err
    assert str(out / "checkpoints" / "step-0000004") in err and "--resume" in err
    assert not (out / LOCK_FILE).exists()
    monkeypatch.setattr(Trainer, "train_step", step)
    assert main(["train", "--out", str(out), "--resume"]) == 0
    assert read_meta(out)["step"] == 8


def test_resuming_a_finished_run_keeps_one_final_record(run):
    assert main(["train", "--out", str(run), "--resume"]) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r.get("final")] == [8]
    assert records[-1].get("final")


@pytest.mark.slow  # a subprocess imports torch and resumes a run (about 5 s each on an idle machine)
@pytest.mark.parametrize("failing", ["model.safetensors", "trainer_state.pt"])
def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one(run, tmp_path, failing):
    """Resuming after step 4, the step-8 checkpoint hits a file-size limit: one clear line, exit 3, step 4 intact."""
    out = shutil.copytree(run, tmp_path / "run")
    shutil.rmtree(out / "checkpoints" / "step-0000008")
    step4 = out / "checkpoints" / "step-0000004"
    weights = (step4 / "model.safetensors").stat().st_size
    limit = weights // 2 if failing == "model.safetensors" else weights + 1  # the optimizer state is larger
    script = textwrap.dedent(
        f"""
        import resource, sys
        resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
        from taperfx.cli import main
        sys.exit(main(["train", "--out", {str(out)!r}, "--resume"]))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=SUBPROCESS_ENV)
    assert result.returncode == 3, result.stderr
    assert result.stderr.count("\n") == 1 and "error[write-failed]" in result.stderr
    assert str(step4) in result.stderr and "--resume" in result.stderr
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-0000004"]  # no partial directory
    model, meta = load_model(out)
    original, _ = load_model(run / "checkpoints" / "step-0000004")
    assert meta["step"] == 4
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), original.state_dict().values()))


def test_stale_temporaries_of_a_killed_run_are_removed(data, tmp_path):
    out = tmp_path / "run"
    assert main(train_args(data, out, "--steps", "4")) == 0
    stale = out / "checkpoints" / ".step-0000008.k1ll3d"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    partial = out / "checkpoints" / f".step-0000008.partial-{2**22 + 7}-abcd"
    partial.mkdir()
    (out / ".run.json.k1ll3d.json").write_text("{")
    assert main(["train", "--out", str(out), "--resume"]) == 0
    assert [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith(".")] == []
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []


def test_outputs_respect_the_umask(data, tmp_path):
    old = os.umask(0o027)
    try:
        out = tmp_path / "run"
        assert main(train_args(data, out, "--steps", "4")) == 0
    finally:
        os.umask(old)
    ckpt = list_checkpoints(out)[-1]
    assert (ckpt / "model.safetensors").stat().st_mode & 0o777 == 0o640
    assert (out / "run.json").stat().st_mode & 0o777 == 0o640
    assert ckpt.stat().st_mode & 0o777 == 0o750


@pytest.mark.slow  # exports, folds and scores four times
def test_eval_reproduces_the_trainers_val_loss_for_runs_checkpoints_and_folded_models(run, tmp_path, capsys):
    val_loss = read_meta(run)["val_loss"]
    assert main(["fold", str(run), "-o", str(tmp_path / "folded.pt2")]) == 0
    assert main(["fold", str(run), "-o", str(tmp_path / "folded")]) == 0  # a folded checkpoint directory
    capsys.readouterr()
    for model in (run, list_checkpoints(run)[-1], tmp_path / "folded.pt2", tmp_path / "folded"):
        assert main(["eval", str(model)]) == 0
        result = json.loads(capsys.readouterr().out)
        tolerance = 1e-6 if model in (run, list_checkpoints(run)[-1]) else 1e-4  # folded: weights rounded once
        assert result["cross_entropy"] == pytest.approx(val_loss, rel=tolerance), model
        assert result["windows"] == {"batch_size": 4, "batches": 2, "context": 32}
        assert result["gate"] == 0.0, model


def test_plot_includes_the_final_validation_point(run):
    from taperfx.train.plot import read_run, validation_curve

    _, records = read_run(run)
    steps, values = validation_curve(records)
    assert steps[-1] == 8 and values[-1] == pytest.approx(read_meta(run)["val_loss"])


def test_a_damaged_metrics_line_is_named(run, tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (broken / "metrics.jsonl").write_text("\n".join([lines[0], lines[1][:10], *lines[2:]]) + "\n")
    assert main(["plot", str(broken), "--out", str(tmp_path / "plots")]) == 3
    err = capsys.readouterr().err
    assert "error[bad-metrics]" in err and f"{broken / 'metrics.jsonl'}:2:" in err
