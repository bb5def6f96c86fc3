"""The fold on models written the way users write them: transformers architectures from random-init
configs, ``nn.Sequential``, ``nn.TransformerEncoder``, ``nn.MultiheadAttention`` and ``nn.Transformer``;
converted with ``taperfx.convert``, set to g = 0, exported, folded, and compared by the test itself with
the unfolded model."""

import pytest
import torch
from torch import nn

import taperfx

transformers = pytest.importorskip("transformers", reason="the optional 'hf' extra (transformers) is not installed")

pytestmark = pytest.mark.slow

SMALL = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
# Norms that rightly stay, with their code: Qwen3's per-head q/k norms feed the rotary embedding, Gemma2's
# post-sublayer norms feed the residual stream, BLOOM's embedding norm too.
STAYS = {
    "gemma2": {
        "post_attention_layernorm": "not_a_linear_consumer",
        "post_feedforward_layernorm": "not_a_linear_consumer",
    },
    "qwen3": {"q_norm": "not_a_linear_consumer", "k_norm": "not_a_linear_consumer"},
    "bloom": {"word_embeddings_layernorm": "not_a_linear_consumer"},
}
CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**SMALL),
    "mistral": lambda: transformers.MistralConfig(**SMALL),
    "qwen2": lambda: transformers.Qwen2Config(**SMALL),
    "qwen3": lambda: transformers.Qwen3Config(**SMALL),
    "phi": lambda: transformers.PhiConfig(**SMALL),
    "falcon": lambda: transformers.FalconConfig(**{k: v for k, v in SMALL.items() if k != "intermediate_size"}),
    "gemma": lambda: transformers.GemmaConfig(**SMALL, head_dim=8),
    "gemma2": lambda: transformers.Gemma2Config(**SMALL, head_dim=8),
    "olmo": lambda: transformers.OlmoConfig(**SMALL),
    "cohere": lambda: transformers.CohereConfig(**SMALL),
    "stablelm": lambda: transformers.StableLmConfig(**SMALL),
    "gpt_neox": lambda: transformers.GPTNeoXConfig(**SMALL),
    "bloom": lambda: transformers.BloomConfig(vocab_size=64, hidden_size=32, n_layer=2, n_head=4),
    "gpt2": lambda: transformers.GPT2Config(vocab_size=64, n_positions=64, n_embd=32, n_layer=2, n_head=4),
    "opt": lambda: transformers.OPTConfig(
        vocab_size=64, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=32
    ),
}


def _gate_zero(model: nn.Module, batch) -> nn.Module:
    """convert ("all") → calibrate on ``batch`` → taper → random γ̃ and β → g = 0, in eval mode."""
    taperfx.convert(model, "all")
    taperfx.calibrate(model, [batch])
    taperfx.set_gate(model, 0.0)
    with torch.no_grad():
        for norm in taperfx.tapernorms(model):
            norm.weight_tilde.normal_(1.0, 0.3)
            if getattr(norm, "bias", None) is not None:
                norm.bias.normal_(0.0, 0.3)
    return model.eval()


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    torch.testing.assert_close(got, want, rtol=0, atol=2e-5 * want.abs().max().item())


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_transformers_architectures_fold_exactly_or_say_why(arch):
    torch.manual_seed(0)
    config = CONFIGS[arch]()
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(0, 64, (2, 6))
    _gate_zero(model, {"input_ids": ids, "use_cache": False})
    with torch.no_grad():
        program = torch.export.export(model, (ids,), {"use_cache": False}, strict=False)
    folded, report = taperfx.fold_program(program, untie_shared=True)
    tapered = {name for name, m in model.named_modules() if isinstance(m, taperfx.TaperNorm)}
    stays = {name: STAYS.get(arch, {}).get(name.rsplit(".", 1)[-1]) for name in tapered}
    assert {f.name for f in report.folded} == {name for name, code in stays.items() if code is None}
    assert report.codes == {name: code for name, code in stays.items() if code is not None}
    assert report.verified and report.layers_checked > 0
    other = torch.randint(0, 64, (2, 6))
    with torch.no_grad():
        _close(folded.module()(other, use_cache=False).logits, model(other, use_cache=False).logits)


def test_a_sequential_folds_through_both_entry_points():
    torch.manual_seed(1)
    x = torch.randn(3, 5, 16)
    model = _gate_zero(
        nn.Sequential(nn.LayerNorm(16), nn.Linear(16, 32), nn.GELU(), nn.RMSNorm(32), nn.Linear(32, 4)), x
    )
    with torch.no_grad():
        program = torch.export.export(model, (x,))
    folded, report = taperfx.fold_program(program, strict=True)
    assert [f.name for f in report.folded] == ["0", "3"]
    eager, eager_report = taperfx.fold_module(model, (x,), strict=True)
    assert [f.name for f in eager_report.folded] == ["0", "3"] and eager_report.verified
    with torch.no_grad():
        _close(folded.module()(x), model(x))
        _close(eager(x), model(x))


def test_a_pre_norm_transformer_encoder_folds_as_a_program():
    torch.manual_seed(2)
    layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.1, batch_first=True, norm_first=True)
    encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
    x = torch.randn(2, 5, 16)
    _gate_zero(encoder, x)
    with torch.no_grad():
        program = torch.export.export(encoder, (x,))
    folded, report = taperfx.fold_program(program)
    tapered = {name for name, m in encoder.named_modules() if isinstance(m, taperfx.TaperNorm)}
    assert {f.name for f in report.folded} | set(report.codes) == tapered
    assert report.folded and report.verified
    with torch.no_grad():
        _close(folded.module()(x), encoder(x))


class SelfAttention(nn.Module):
    """A pre-norm ``nn.MultiheadAttention`` block: q, k and v read the norm through one packed ``in_proj``."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(16)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)

    def forward(self, x, memory):
        h = self.norm(x)
        return x + self.attn(h, h, h, need_weights=False)[0]


class Seq2Seq(nn.Module):
    """A pre-norm ``nn.Transformer`` with a head."""

    def __init__(self) -> None:
        super().__init__()
        self.t = nn.Transformer(16, 2, 1, 1, 32, dropout=0.0, batch_first=True, norm_first=True)
        self.head = nn.Linear(16, 5)

    def forward(self, x, memory):
        return self.head(self.t(memory, x))


# A cross-attention query (or key and value) reads a slice of the packed in_proj weight: not a stored tensor.
TORCH_NN = {
    SelfAttention: {},
    Seq2Seq: {"t.encoder.norm": "weight_not_stored", "t.decoder.layers.0.norm2": "weight_not_stored"},
}


@pytest.mark.parametrize("cls", TORCH_NN, ids=lambda cls: cls.__name__)
def test_torch_nn_attention_models_fold_exactly_or_say_why(cls):
    torch.manual_seed(4)
    x, memory = torch.randn(2, 5, 16), torch.randn(2, 7, 16)
    model = _gate_zero(cls(), (x, memory))
    with torch.no_grad():
        program = torch.export.export(model, (x, memory))
    folded, report = taperfx.fold_program(program)
    tapered = {name for name, m in model.named_modules() if isinstance(m, taperfx.TaperNorm)}
    assert report.codes == TORCH_NN[cls]
    assert {f.name for f in report.folded} == tapered - set(TORCH_NN[cls]) and report.verified
    with torch.no_grad():
        _close(folded.module()(x * 2 - 1, memory + 1), model(x * 2 - 1, memory + 1))
