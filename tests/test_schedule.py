"""Gate schedule values (docs/method.md §5) and the trainer-facing apply()."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from taperfx import GateSchedule, TaperRMSNorm, convert
from taperfx.models import ModelConfig, build_model

bounds = st.tuples(st.integers(0, 500), st.integers(0, 500)).map(sorted)


@given(bounds, st.integers(-10, 1000))
def test_values_in_range_and_monotone(b, t):
    sched = GateSchedule(*b)
    g = sched(t)
    assert 0.0 <= g <= 1.0
    assert sched(t + 1) <= g


@given(bounds)
def test_boundaries(b):
    start, end = b
    sched = GateSchedule(start, end)
    assert sched(start - 1) == 1.0
    assert sched(end) == 0.0 and sched(end + 10) == 0.0
    if end > start:
        assert sched(start) == 1.0  # cos(0): the taper starts from exactly 1
        if (end - start) % 2 == 0:
            assert sched((start + end) // 2) == pytest.approx(0.5)


def test_cosine_shape():
    sched = GateSchedule(10, 110)
    for t in (10, 35, 60, 85, 109):
        assert sched(t) == pytest.approx(0.5 * (1 + math.cos(math.pi * (t - 10) / 100)))


def test_bad_bounds():
    with pytest.raises(ValueError, match="taper_end"):
        GateSchedule(10, 5)
    with pytest.raises(ValueError, match="taper_start"):
        GateSchedule(-1, 5)


def test_apply_calibrates_once_and_sets_every_gate():
    model = convert(build_model(ModelConfig(vocab_size=50, dim=16, n_layers=2, n_heads=2, max_seq_len=16)))
    ids = torch.randint(0, 50, (2, 8))
    sched = GateSchedule(2, 6)
    gates = []
    for step in range(8):
        g = sched.apply(model, step)
        gates.append(g)
        model.train()(ids)
        norms = [m for m in model.modules() if isinstance(m, TaperRMSNorm)]
        assert {m.gate_value for m in norms} == {g}
        assert all(int(m.ema_steps) == min(step + 1, 2) for m in norms)
    assert gates[:3] == [1.0, 1.0, 1.0] and gates[-2:] == [0.0, 0.0]
    restored = GateSchedule(0, 1)
    restored.load_state_dict(sched.state_dict())
    assert (restored.taper_start, restored.taper_end, restored.last_step) == (2, 6, 7)
