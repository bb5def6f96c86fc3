"""Shared test settings and fixtures: a bounded hypothesis profile so the suite stays within CI's budget, the
``cuda`` marker's skip, and the tiny-decoder factory. Helpers live in ``tests/helpers/``, not here."""

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "default",
    max_examples=int(os.environ.get("TAPERFX_HYPOTHESIS_EXAMPLES", "25")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("default")

torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` skip, saying why, when no CUDA device is visible."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; none is visible")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def make_decoder():
    """Factory for tiny reference decoders: ``make_decoder(arch, mode=None|"internal"|"all", gate=0.0)``.

    Untied embeddings and a 4× wider init than training's keep greedy decoding from
    repeating one token; tapered models get a random γ̃ and LN bias so that folding
    has something to get wrong. Calibrated on one batch before the gate is set.
    """
    import taperfx
    from taperfx.models import ModelConfig, build_model

    def make(arch: str, mode: str | None = None, gate: float = 0.0, vocab_size: int = 96, seed: int = 0):
        torch.manual_seed(seed)
        config = ModelConfig(
            arch=arch, vocab_size=vocab_size, dim=32, n_layers=2, n_heads=2, max_seq_len=48, tie_embeddings=False
        )
        model = build_model(config)
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(4.0 if p.dim() > 1 else 1.0)
        if mode is not None:
            taperfx.convert(model, mode)
            taperfx.calibrate(model, [torch.randint(0, vocab_size, (2, 16))])
            with torch.no_grad():
                for norm in taperfx.tapernorms(model):
                    norm.weight_tilde.normal_(1.0, 0.2)
                    if getattr(norm, "bias", None) is not None:
                        norm.bias.normal_(0.0, 0.1)
            taperfx.set_gate(model, gate)
        return model.eval()

    return make
