"""The radial-gradient facts of docs/method.md §7, checked numerically, and the scale anchor."""

import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from taperfx import ScaleAnchor, token_scale


def _radial(loss_fn, h):
    h = h.clone().requires_grad_(True)
    loss_fn(h).backward()
    return (h.grad * h).sum().item(), h.grad.norm().item() * h.norm().item()


@given(st.integers(0, 2**16), st.integers(4, 64))
def test_final_norm_removes_the_radial_gradient(seed, d):
    """A 0-homogeneous final norm: ⟨∇_h L, h⟩ ≈ 0 (exactly 0 but for eps)."""
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(6, d, generator=gen, dtype=torch.float64) * 3
    w = torch.randn(11, d, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 11, (6,), generator=gen)
    norm = nn.RMSNorm(d, eps=1e-12).double()
    radial, scale = _radial(lambda h: F.cross_entropy(norm(h) @ w.T, y), h)
    assert abs(radial) <= 1e-8 * max(scale, 1.0)


@given(st.integers(0, 2**16), st.integers(4, 64))
def test_without_anchor_cross_entropy_chases_logits(seed, d):
    """No final norm and a positive margin: growing h lowers the loss, ⟨∇_h L, h⟩ < 0 (Prop. 4.2)."""
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(6, d, generator=gen, dtype=torch.float64)
    w = torch.randn(11, d, generator=gen, dtype=torch.float64)
    y = (h @ w.T).argmax(-1)  # every token classified correctly: positive margin
    radial, _ = _radial(lambda h: F.cross_entropy(h @ w.T, y), h)
    assert radial < 0


@given(st.integers(0, 2**16), st.floats(0.2, 5.0), st.sampled_from(["rms", "ln"]))
def test_scale_loss_pulls_s_toward_target(seed, target, kind):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(5, 16, generator=gen, dtype=torch.float64)

    def loss(h):
        return (token_scale(h, kind) - target).square().mean()

    h = h.clone().requires_grad_(True)
    s_before = token_scale(h, kind).detach()
    loss(h).backward()
    stepped = (h - 0.05 * h.grad).detach()
    s_after = token_scale(stepped, kind)
    moved_toward = (s_after - target).abs() <= (s_before - target).abs() + 1e-12
    assert moved_toward.all()


def test_anchor_tracks_freezes_and_penalises():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.RMSNorm(8))
    anchor = ScaleAnchor.attach(model, ema_alpha=0.5)
    x = torch.randn(4, 8)
    model.train()(x)
    assert anchor.loss().item() == 0.0  # no target yet
    expected = token_scale(model[0](x), "rms", model[1].eps).mean()
    torch.testing.assert_close(anchor.estimate, expected)  # bias correction: one step is exact
    anchor.freeze()
    model(x * 3)
    assert anchor.loss().item() > 0
    assert int(anchor.ema_steps) == 1  # frozen: no more tracking
    state = anchor.state_dict()
    assert bool(state["frozen"]) and torch.equal(state["target"], expected)
