"""Training defaults that do not diverge: a calibration window before the taper, refusal of a too-early
taper, and the scale loss on the baseline (the ablation of bench/reproduce_realtext.py)."""

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

import taperfx
from taperfx.errors import BadInput
from taperfx.schedule import ScheduleError, calibration_window
from taperfx.train.checkpoint import load_model
from taperfx.train.loop import train
from taperfx.train.prepare import prepare_data

from helpers.tiny_runs import tiny_config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return prepare_data(tmp_path_factory.mktemp("data") / "d", n_stories=200, vocab_size=320)


def config(*overrides, data="d", out="r"):
    return tiny_config(data, out, *overrides)


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    ("steps", "taper_start"),
    [(1000, 50), (400, 20), (200, 20), (100, 20), (79, 19), (40, 10), (12, 3), (4, 1), (2, 1)],
)
def test_default_taper_start_is_the_later_of_warmup_and_calibration(steps, taper_start):
    c = config("protocol='internal'", f"steps={steps}")
    assert c.taper_start_step == taper_start
    assert c.taper_start_step == max(c.warmup_steps, c.calibration_window)


@given(st.integers(2, 5000), st.integers(1, 200), st.sampled_from(["internal", "all"]))
def test_default_schedule_always_leaves_the_calibration_window(steps, calibration_steps, protocol):
    c = config(f"protocol='{protocol}'", f"steps={steps}", f"calibration_steps={calibration_steps}")
    window = calibration_window(steps, calibration_steps)
    assert 1 <= window <= max(1, steps // 4) and window <= calibration_steps
    assert window <= c.taper_start_step <= c.taper_end_step <= steps


@pytest.mark.parametrize("protocol", ["internal", "all"])
def test_too_early_taper_is_refused_with_code_and_window(protocol):
    with pytest.raises(ScheduleError) as caught:
        config(f"protocol='{protocol}'", "steps=40", "taper_start=2")
    assert caught.value.code == "calibration_window_too_short"
    assert caught.value.details == {"taper_start": 2, "calibration_window": 10}
    # The suggested remedies are accepted: a later start, or an explicit shorter calibration window.
    assert config(f"protocol='{protocol}'", "steps=40", "taper_start=10").taper_start_step == 10
    assert config(f"protocol='{protocol}'", "steps=40", "taper_start=2", "calibration_steps=2").calibration_window == 2


def test_baseline_needs_the_window_only_with_the_scale_loss():
    assert config("protocol='baseline'", "steps=40", "taper_start=2").taper_start_step == 2
    with pytest.raises(ScheduleError) as caught:
        config("protocol='baseline'", "steps=40", "taper_start=2", "scale_loss_on_baseline=true")
    assert caught.value.code == "calibration_window_too_short"
    with pytest.raises(BadInput) as caught:
        config("protocol='internal'", "scale_loss_on_baseline=true")
    assert caught.value.code == "config-choice"
    with pytest.raises(BadInput) as caught:
        config("calibration_steps=0")
    assert caught.value.code == "config-range"


def test_c_is_calibrated_over_the_whole_window(data_dir, tmp_path):
    final = train(
        config(
            "protocol='internal'",
            "steps=16",
            "eval_interval=16",
            "checkpoint_interval=16",
            data=data_dir,
            out=tmp_path / "run",
        )
    )
    model, _ = load_model(final)
    gates = [r["gate"] for r in records(tmp_path / "run") if not r.get("final")]
    assert gates[:5] == [1.0] * 5 and gates[5] < 1.0  # window = 16 // 4; the cosine starts from 1 at step 4
    for norm in taperfx.tapernorms(model):
        assert int(norm.ema_steps) == 4


def test_scale_loss_on_baseline_anchors_from_the_taper_start_step(data_dir, tmp_path):
    common = ("protocol='baseline'", "steps=12", "eval_interval=12", "checkpoint_interval=12", "calibration_steps=3")
    train(config(*common, data=data_dir, out=tmp_path / "plain"))
    train(config(*common, "scale_loss_on_baseline=true", data=data_dir, out=tmp_path / "anchored"))
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
