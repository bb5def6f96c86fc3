"""convert() on transformers architectures built from random-init configs, and the README's table of
which norm classes convert (every class it names is checked here)."""

import importlib
import re
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import taperfx
from taperfx import ConversionWarning, TaperLayerNorm, TaperNorm
from taperfx.norm_families import classify

transformers = pytest.importorskip("transformers", reason="the optional 'hf' extra (transformers) is not installed")

VOCAB = 128
FAMILIES = {"rms", "rms_offset", "ln", "ln_offset"}
SMALL = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=64,
)

# family: (config class, model class, config overrides, expected {norm class: family or refusal code})
ARCHITECTURES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}, {"LlamaRMSNorm": "rms"}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {}, {"Qwen3RMSNorm": "rms"}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {}, {"GemmaRMSNorm": "rms_offset"}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {}, {"Gemma2RMSNorm": "rms_offset"}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {}, {"Gemma3RMSNorm": "rms_offset"}),
    "cohere-qk-norm": (
        "CohereConfig",
        "CohereForCausalLM",
        {"use_qk_norm": True},
        {"CohereLayerNorm": "ln", "CohereLayerNorm(heads, head_dim)": "multi_axis"},
    ),
    "falcon": (
        "FalconConfig",
        "FalconForCausalLM",
        {"head_dim": None, "num_key_value_heads": None, "intermediate_size": None},
        {"LayerNorm": "ln"},
    ),
    "olmo": ("OlmoConfig", "OlmoForCausalLM", {}, {"OlmoLayerNorm": "ln"}),
    "nemotron": ("NemotronConfig", "NemotronForCausalLM", {}, {"NemotronLayerNorm1P": "ln_offset"}),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", {"n_embd": 32, "n_layer": 2, "n_head": 4}, {"LayerNorm": "ln"}),
    "mamba2": (
        "Mamba2Config",
        "Mamba2ForCausalLM",
        {"num_heads": 4, "head_dim": 16, "expand": 2, "n_groups": 1, "state_size": 8},
        {"Mamba2RMSNorm": "rms", "Mamba2RMSNormGated": "extra_forward_args"},
    ),
    "t5-encoder": (
        "T5Config",
        "T5EncoderModel",
        {"d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_heads": 4},
        {"T5LayerNorm": "rms"},
    ),
}


def build(arch: str) -> nn.Module:
    config_cls, model_cls, overrides, _ = ARCHITECTURES[arch]
    kwargs = {k: v for k, v in {**SMALL, **overrides}.items() if v is not None}
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = getattr(transformers, config_cls)(**kwargs)
        return getattr(transformers, model_cls)(config).eval()


def output(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _label(module: nn.Module) -> str:
    weight = getattr(module, "weight", None)
    two_axis = isinstance(weight, torch.Tensor) and weight.dim() == 2
    return type(module).__name__ + ("(heads, head_dim)" if two_axis else "")


def _fixed_map(norm: TaperNorm, x: torch.Tensor) -> torch.Tensor:
    """g = 0 written out in float64: x ⊙ c·γ̃ (LN: x̄ ⊙ c·γ̃ + β)."""
    x = x.double()
    if isinstance(norm, TaperLayerNorm):
        x = x - x.mean(-1, keepdim=True)
    y = x * (norm.c.double() * norm.weight_tilde.double())
    return y + norm.bias.double() if getattr(norm, "bias", None) is not None else y


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_architecture_converts_exactly_at_gate_one_and_to_the_fixed_map_at_zero(arch):
    model = build(arch)
    expected = ARCHITECTURES[arch][3]
    norms = {name: _label(m) for name, m in model.named_modules() if _label(m) in expected}
    assert set(norms.values()) == set(expected)
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = output(model, ids)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        taperfx.convert(model, "all")
    refused = {(w.message.module, w.message.code) for w in record if isinstance(w.message, ConversionWarning)}
    assert refused == {(n, expected[label]) for n, label in norms.items() if expected[label] not in FAMILIES}
    tapered = {n for n, m in model.named_modules() if isinstance(m, TaperNorm)}
    assert tapered == {n for n, label in norms.items() if expected[label] in FAMILIES}
    with torch.no_grad():
        torch.testing.assert_close(output(model, ids), before, rtol=1e-5, atol=1e-5 * before.abs().max().item())

    taperfx.calibrate(model, [ids])
    taperfx.set_gate(model, 0.0)
    seen = []
    hooks = [
        m.register_forward_hook(lambda mod, args, out: seen.append((mod, args[0], out)))
        for m in taperfx.tapernorms(model)
    ]
    with torch.no_grad():
        output(model, ids)
    for h in hooks:
        h.remove()
    assert len(seen) >= len(tapered)
    for norm, x, y in seen:
        want = _fixed_map(norm, x)
        torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


# The README table names these classes; each is built here and must classify as the table says.
TORCH = "torch.nn"
CONSTRUCTORS = {
    "nn.RMSNorm": (TORCH, "RMSNorm", (16,)),
    "nn.LayerNorm": (TORCH, "LayerNorm", (16,)),
    "nn.LayerNorm(bias=False)": (TORCH, "LayerNorm", (16,), {"bias": False}),
    "nn.LayerNorm(elementwise_affine=False)": (TORCH, "LayerNorm", (16,), {"elementwise_affine": False}),
    "nn.LayerNorm((4, d))": (TORCH, "LayerNorm", ((4, 16),)),
    "LlamaRMSNorm": ("llama", "LlamaRMSNorm", (16,)),
    "MistralRMSNorm": ("mistral", "MistralRMSNorm", (16,)),
    "MixtralRMSNorm": ("mixtral", "MixtralRMSNorm", (16,)),
    "Qwen2RMSNorm": ("qwen2", "Qwen2RMSNorm", (16,)),
    "Qwen3RMSNorm": ("qwen3", "Qwen3RMSNorm", (16,)),
    "Phi3RMSNorm": ("phi3", "Phi3RMSNorm", (16,)),
    "Olmo2RMSNorm": ("olmo2", "Olmo2RMSNorm", (16,)),
    "DeepseekV3RMSNorm": ("deepseek_v3", "DeepseekV3RMSNorm", (16,)),
    "Mamba2RMSNorm": ("mamba2", "Mamba2RMSNorm", (16,)),
    "T5LayerNorm": ("t5", "T5LayerNorm", (16,)),
    "GemmaRMSNorm": ("gemma", "GemmaRMSNorm", (16,)),
    "Gemma2RMSNorm": ("gemma2", "Gemma2RMSNorm", (16,)),
    "Gemma3RMSNorm": ("gemma3", "Gemma3RMSNorm", (16,)),
    "Qwen3NextRMSNorm": ("qwen3_next", "Qwen3NextRMSNorm", (16,)),
    "CohereLayerNorm": ("cohere", "CohereLayerNorm", (16,)),
    "CohereLayerNorm((heads, head_dim))": ("cohere", "CohereLayerNorm", ((4, 16),)),
    "OlmoLayerNorm": ("olmo", "OlmoLayerNorm", (16,)),
    "NemotronLayerNorm1P": ("nemotron", "NemotronLayerNorm1P", (16,)),
    "Mamba2RMSNormGated": ("mamba2", "Mamba2RMSNormGated", (16, 4)),
    "Qwen3NextRMSNormGated": ("qwen3_next", "Qwen3NextRMSNormGated", (16,)),
    "BambaRMSNormGated": ("bamba", "BambaRMSNormGated", (16, 4)),
    "Llama4TextWeightlessRMSNorm": ("llama4", "Llama4TextWeightlessRMSNorm", ()),
}


def _readme_table() -> dict[str, str]:
    """``{class as written in the README: family or refusal code}`` from "Which norms convert"."""
    text = (Path(__file__).parent.parent / "README.md").read_text()
    section = text.split("## Which norms convert", 1)[1].split("\n## ", 1)[0]
    table = {}
    for row in section.splitlines():
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        if len(cells) >= 2 and cells[1].startswith("`"):
            code = cells[1].strip("`")
            for name in re.findall(r"`([^`]+)`", cells[0]):
                table[name] = code
    return table


def _construct(module: str, name: str, args: tuple, kwargs: dict | None = None) -> nn.Module | None:
    if module == TORCH:
        return getattr(nn, name)(*args, **(kwargs or {}))
    found = importlib.import_module(f"transformers.models.{module}.modeling_{module}")
    cls = getattr(found, name, None)  # a class this transformers release lacks is skipped, not an import error
    return None if cls is None else cls(*args, **(kwargs or {}))


def test_readme_table_names_exactly_the_checked_classes():
    assert set(_readme_table()) == set(CONSTRUCTORS)


@pytest.mark.parametrize("written", sorted(CONSTRUCTORS))
def test_readme_table_row_holds(written):
    module = _construct(*CONSTRUCTORS[written])
    if module is None:
        pytest.skip(f"transformers {transformers.__version__} has no {written}")
    verdict = classify(module)
    got = verdict.family.name if verdict.family is not None else str(verdict.refusal)
    assert got == _readme_table()[written]
