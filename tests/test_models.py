"""Reference decoders: the explicit KV cache gives what the full, cache-free forward gives."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import taperfx
from taperfx.models import PRESETS, ModelConfig, build_model, generate, preset

from helpers.tapering import taper_to

ARCHS = ["llama", "gpt2"]


def tiny(arch, **kw):
    cfg = dict(arch=arch, vocab_size=64, dim=32, n_layers=2, n_heads=4, max_seq_len=48)
    cfg.update(kw)
    torch.manual_seed(0)
    return build_model(ModelConfig(**cfg)).eval()


@pytest.fixture(scope="module", params=ARCHS)
def model(request):
    return tiny(request.param)


@given(st.integers(1, 3), st.integers(2, 20), st.data())
def test_chunked_prefill_with_cache_equals_full_forward(model, batch, length, data):
    split = data.draw(st.integers(1, length - 1))
    ids = torch.randint(0, 64, (batch, length), generator=torch.Generator().manual_seed(length))
    with torch.no_grad():
        full, present = model(ids)
        head, cache = model(ids[:, :split])
        tail, cache = model(ids[:, split:], torch.arange(split, length).expand(batch, -1), cache)
    torch.testing.assert_close(torch.cat([head, tail], 1), full, rtol=1e-5, atol=1e-5)
    assert all(k.shape == (batch, 4, length, 8) for k, _ in cache)
    for (k1, v1), (k2, v2) in zip(cache, present):
        torch.testing.assert_close(k1, k2, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("taper", [None, "internal", "all"])
def test_greedy_with_cache_equals_no_cache(arch, taper):
    model = tiny(arch)
    if taper:
        taper_to(taperfx.convert(model, taper), torch.randint(0, 64, (2, 12)))
    prompt = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(1))
    cached = generate(model, prompt, 12)
    seq = prompt
    with torch.no_grad():
        for _ in range(12):
            logits, _ = model(seq)
            seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(cached, seq)


def test_sampling_is_reproducible_and_respects_top_k():
    model = tiny("llama")
    prompt = torch.randint(0, 64, (1, 4))
    runs = [
        generate(model, prompt, 10, temperature=1.0, top_k=3, generator=torch.Generator().manual_seed(7))
        for _ in range(2)
    ]
    assert torch.equal(*runs)
    logits = torch.tensor([[0.0, 5.0, 4.0, -1.0, 3.0]])
    from taperfx.models import sample_next

    draws = {int(sample_next(logits, 1.0, 2, torch.Generator().manual_seed(s))) for s in range(50)}
    assert draws == {1, 2}


def test_tied_embeddings_and_presets():
    model = tiny("llama")
    assert model.output.weight is model.tok_embeddings.weight
    assert tiny("gpt2", tie_embeddings=False).output.weight is not None
    cfg = preset("tinystories-512")
    assert (cfg.dim, cfg.n_layers, cfg.n_heads) == (512, 8, 16)
    assert set(PRESETS) >= {f"tinystories-{w}" for w in (64, 128, 256, 512)}
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


def test_bad_input():
    model = tiny("llama")
    with pytest.raises(ValueError, match="exceeds the model's context of 48"):
        model(torch.zeros(1, 49, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(batch, seq\)"):
        model(torch.zeros(5, dtype=torch.long))
    _, cache = model(torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="past_key_values has 1 layers"):
        model(torch.zeros(1, 1, dtype=torch.long), past_key_values=cache[:1])
    with pytest.raises(ValueError, match="divisible"):
        ModelConfig(dim=30, n_heads=4)
    with pytest.raises(ValueError, match="unknown preset"):
        preset("tinystories-1")
    with pytest.raises(ValueError, match="unknown model config keys"):
        ModelConfig.from_dict({"dim": 8, "colour": 1})
