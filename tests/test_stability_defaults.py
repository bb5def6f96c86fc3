"""Training defaults that do not diverge: from scratch, 100 calibration steps before the taper and refusal of
schedules too short for them; a short window when fine-tuning; refusal of a too-early taper; and the scale loss
on the baseline (the ablation of bench/reproduce_realtext.py)."""

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

import taperfx
from taperfx.errors import BadInput
from taperfx.schedule import (
    FINE_TUNE_CALIBRATION_STEPS,
    FROM_SCRATCH_CALIBRATION_STEPS,
    MIN_TAPER_WINDOWS,
    ScheduleError,
)
from taperfx.train.checkpoint import load_model
from taperfx.train.config import load_config
from taperfx.train.loop import train
from taperfx.train.prepare import prepare_data

from helpers.tiny_runs import tiny_config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return prepare_data(tmp_path_factory.mktemp("data") / "d", n_stories=200, vocab_size=320)


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def config(*overrides, data="d", out="r"):
    return load_config(None, [f"data={json.dumps(str(data))}", f"out={json.dumps(str(out))}", *overrides])


@pytest.mark.parametrize(("steps", "taper_start"), [(300, 100), (1000, 100), (2000, 100), (3000, 150), (8000, 400)])
def test_from_scratch_the_taper_waits_for_the_calibration_window(steps, taper_start):
    c = config("protocol='internal'", f"steps={steps}")
    assert c.calibration_window == FROM_SCRATCH_CALIBRATION_STEPS == 100
    assert c.taper_start_step == taper_start == max(c.warmup_steps, 100)


@pytest.mark.parametrize(("steps", "window"), [(200, 20), (40, 10), (12, 3), (2, 1)])
def test_fine_tuning_calibrates_over_the_short_window(steps, window):
    # A pretrained stream has its trained scale from step 0 (the paper's GPT-2 schedules taper from step 10-50).
    c = config("protocol='internal'", f"steps={steps}", "init_from='hf:pretrained'")
    assert c.calibration_window == min(FINE_TUNE_CALIBRATION_STEPS, max(1, steps // 4)) == window
    assert c.taper_start_step == max(c.warmup_steps, window)


@pytest.mark.parametrize("protocol", ["internal", "all"])
@pytest.mark.parametrize("steps", [2, 40, 100, 299])
def test_short_tapered_runs_from_scratch_are_refused_with_the_numbers(protocol, steps):
    with pytest.raises(ScheduleError) as caught:
        config(f"protocol='{protocol}'", f"steps={steps}")
    assert caught.value.code == "schedule-too-short"
    assert caught.value.details == {
        "steps": steps,
        "taper_start": 100,
        "taper_end": steps - 1,
        "calibration_window": 100,
        "min_taper": 200,
    }
    assert isinstance(caught.value, BadInput)  # the CLI's exit code 2
    # The suggested remedies are accepted: the suggested length, or an explicit calibration window.
    assert config(f"protocol='{protocol}'", "steps=300").taper_start_step == 100
    assert config(f"protocol='{protocol}'", f"steps={steps}", "calibration_steps=1").calibration_window == 1


def test_an_explicit_taper_end_too_soon_is_refused():
    with pytest.raises(ScheduleError) as caught:
        config("protocol='all'", "steps=1000", "taper_end=250")
    assert caught.value.code == "schedule-too-short"
    assert (caught.value.details["taper_start"], caught.value.details["taper_end"]) == (100, 250)
    assert config("protocol='all'", "steps=1000", "taper_end=299").taper_end_step == 299


@given(st.integers(2, 5000), st.one_of(st.none(), st.integers(1, 400)), st.sampled_from(["internal", "all"]))
def test_every_accepted_schedule_calibrates_before_it_tapers(steps, calibration_steps, protocol):
    explicit = [] if calibration_steps is None else [f"calibration_steps={calibration_steps}"]
    try:
        c = config(f"protocol='{protocol}'", f"steps={steps}", *explicit)
    except BadInput as refused:
        if calibration_steps is None:
            assert refused.code == "schedule-too-short" and steps < 300
        else:  # an explicit window longer than the run leaves no step to taper
            assert refused.code == "config-range" and calibration_steps >= steps
        return
    window = calibration_steps or FROM_SCRATCH_CALIBRATION_STEPS
    assert c.calibration_window == window <= c.taper_start_step <= c.taper_end_step <= steps
    if calibration_steps is None:
        assert c.taper_end_step - c.taper_start_step + 1 >= MIN_TAPER_WINDOWS * window


@pytest.mark.parametrize("protocol", ["internal", "all"])
def test_too_early_taper_is_refused_with_code_and_window(protocol):
    with pytest.raises(ScheduleError) as caught:
        config(f"protocol='{protocol}'", "steps=1000", "taper_start=20")
    assert caught.value.code == "calibration-window-too-short"
    assert caught.value.details == {"taper_start": 20, "calibration_window": 100}
    # The suggested remedies are accepted: a later start, or an explicit shorter calibration window.
    assert config(f"protocol='{protocol}'", "steps=1000", "taper_start=100").taper_start_step == 100
    assert config(f"protocol='{protocol}'", "steps=40", "taper_start=2", "calibration_steps=2").calibration_window == 2


def test_baseline_needs_the_window_only_with_the_scale_loss():
    assert config("protocol='baseline'", "steps=40", "taper_start=2").taper_start_step == 2
    assert config("protocol='baseline'", "steps=40").taper_start_step == 10  # a quarter: no taper to survive
    with pytest.raises(ScheduleError) as caught:
        config("protocol='baseline'", "steps=40", "taper_start=2", "scale_loss_on_baseline=true")
    assert caught.value.code == "calibration-window-too-short"
    with pytest.raises(BadInput) as caught:
        config("protocol='internal'", "scale_loss_on_baseline=true")
    assert caught.value.code == "config-choice"
    with pytest.raises(BadInput) as caught:
        config("calibration_steps=0")
    assert caught.value.code == "config-range"


def test_c_is_calibrated_over_the_whole_window(data_dir, tmp_path):
    final = train(
        tiny_config(
            data_dir,
            tmp_path / "run",
            "protocol='internal'",
            "steps=16",
            "calibration_steps=4",
            "eval_interval=16",
            "checkpoint_interval=16",
        )
    )
    model, _ = load_model(final)
    gates = [r["gate"] for r in records(tmp_path / "run") if not r.get("final")]
    assert gates[:5] == [1.0] * 5 and gates[5] < 1.0  # the cosine starts from 1 at step 4
    for norm in taperfx.tapernorms(model):
        assert int(norm.ema_steps) == 4


def test_scale_loss_on_baseline_anchors_from_the_taper_start_step(data_dir, tmp_path):
    common = ("protocol='baseline'", "steps=12", "eval_interval=12", "checkpoint_interval=12", "calibration_steps=3")
    train(tiny_config(data_dir, tmp_path / "plain", *common))
    train(tiny_config(data_dir, tmp_path / "anchored", *common, "scale_loss_on_baseline=true"))
    plain = [r for r in records(tmp_path / "plain") if not r.get("final")]
    anchored = [r for r in records(tmp_path / "anchored") if not r.get("final")]
    # Steps 0..2 calibrate the target and train identically; from step 3 on the scale loss acts.
    assert [r["loss"] for r in anchored[:4]] == [r["loss"] for r in plain[:4]]
    assert all(r["scale_target"] is None and r["scale_loss"] == 0.0 for r in anchored[:3])
    target = anchored[3]["scale_target"]
    assert target > 0 and all(r["scale_target"] == target for r in anchored[3:])
    assert all(r["scale_loss"] > 0 for r in anchored[3:])
    # mean (s - s*)² >= (mean s - s*)² (Jensen), with the logged batch-mean scale s.
    assert all(r["scale_loss"] >= (r["prelogit_scale"] - target) ** 2 * (1 - 1e-5) for r in anchored[3:])
    assert [r["loss"] for r in anchored[5:]] != [r["loss"] for r in plain[5:]]
    assert all(r["scale_target"] is None for r in plain)
