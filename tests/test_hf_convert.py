"""taperfx on transformers models: convert, the decoder adapter, export + fold, eager fold, presets."""

import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import taperfx
from taperfx.hf import GPT2_FINETUNE, HFCausalLM, HFSource
from taperfx.passes import fold_module, fold_program, verify
from taperfx.passes.guard import GuardedIdentity
from taperfx.train.config import TrainConfig

from helpers.hf_tiny import VOCAB, hf_model, save_checkpoint_dir
from helpers.tapering import taper_to

FINAL = {"gpt2": "transformer.ln_f", "llama": "model.norm"}
ARCHS = tuple(FINAL)


def ids(batch=2, length=7, seed=0):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def tapered(arch, mode="internal"):
    """A converted model calibrated on one batch and set to g = 0, in eval mode."""
    return taper_to(taperfx.convert(HFCausalLM(hf_model(arch)), mode), ids(seed=1))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mode", ["internal", "all"])
def test_convert_keeps_outputs_at_gate_one_and_finds_the_final_norm(arch, mode):
    original = hf_model(arch)
    converted = taperfx.convert(copy.deepcopy(original), mode)
    norms = [name for name, _ in taperfx.find_norms(original)]
    assert taperfx.find_final_norm(original) == FINAL[arch]
    tapers = {name for name, m in converted.named_modules() if isinstance(m, taperfx.TaperNorm)}
    assert tapers == (set(norms) if mode == "all" else set(norms) - {FINAL[arch]})
    if mode == "internal":
        assert type(converted.get_submodule(FINAL[arch])) is type(original.get_submodule(FINAL[arch]))
    with torch.no_grad():
        want, got = original(ids()).logits, converted(ids()).logits
    # GPT-2's TaperLN calls the same F.layer_norm; Llama's RMSNorm rounds through its own float32 path.
    if arch == "gpt2":
        assert torch.equal(want, got)
    else:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
@given(split=st.integers(1, 6))
def test_adapter_cache_continues_the_prefill(arch, split):
    model = HFCausalLM(hf_model(arch))
    tokens = ids()
    positions = torch.arange(tokens.shape[1]).expand(2, -1)
    with torch.no_grad():
        full, _ = model(tokens, positions)
        head, cache = model(tokens[:, :split], positions[:, :split])
        tail, grown = model(tokens[:, split:], positions[:, split:], cache)
    torch.testing.assert_close(torch.cat([head, tail], 1), full, rtol=1e-5, atol=1e-5)
    assert len(grown) == 2 and all(k.shape[2] == tokens.shape[1] for k, _ in grown)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mode", ["internal", "all"])
def test_exported_program_folds_and_verifies(arch, mode):
    model = tapered(arch, mode)
    program = torch.export.export(model, (ids(),), strict=False)
    folded, report = fold_program(program, untie_shared=True)
    internal = {f"hf.{n}" for n, m in model.hf.named_modules() if isinstance(m, taperfx.TaperNorm) and n != FINAL[arch]}
    assert internal <= {f.name for f in report.folded}
    # Whatever is not folded (the real final norm; in All mode, so far, the tapered one) is explained.
    assert {f.name for f in report.folded} | {s.name for s in report.skipped} == internal | {f"hf.{FINAL[arch]}"}
    assert verify(program, folded, (ids(seed=3),)).ok
    torch.testing.assert_close(folded.module()(ids(seed=4))[0], model(ids(seed=4))[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_fold_module_replaces_tapered_norms_by_identity(arch):
    model = tapered(arch)
    folded, report = fold_module(model.hf, (ids(),), {"use_cache": False})
    for name, _ in taperfx.find_norms(model.hf):
        want = GuardedIdentity if name != FINAL[arch] else type(model.hf.get_submodule(name))
        assert isinstance(folded.get_submodule(name), want), name
    assert len(report.folded) == 4
    with torch.no_grad():
        torch.testing.assert_close(folded(ids(seed=5)).logits, model.hf(ids(seed=5)).logits, rtol=1e-5, atol=1e-5)


def test_gpt2_conv1d_fold_scales_the_input_axis():
    """Conv1D keeps W as (in, out): the fold must scale rows (inputs), not columns."""
    model = tapered("gpt2")
    folded, _ = fold_module(model.hf, (ids(),), {"use_cache": False})
    norm, before = model.hf.transformer.h[0].ln_1, model.hf.transformer.h[0].attn.c_attn
    after = folded.transformer.h[0].attn.c_attn
    centered = torch.eye(32) - 1.0 / 32  # TaperLN: W' = diag(s)·P·W in Conv1D's (in, out) layout
    want = centered @ (norm.scale().detach()[:, None] * before.weight.detach())
    torch.testing.assert_close(after.weight.detach(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(after.bias.detach(), before.bias.detach() + norm.bias.detach() @ before.weight.detach())


@pytest.mark.parametrize("name", sorted(GPT2_FINETUNE))
def test_finetune_presets_reach_the_trainer_exactly(name):
    preset = GPT2_FINETUNE[name]
    config = TrainConfig(**preset.overrides(), init_from="hf:gpt2")  # fine-tuning: a trained stream, 20-step window
    assert (config.steps, config.warmup_steps, config.taper_start_step, config.taper_end_step) == (
        preset.steps,
        preset.warmup,
        preset.taper_start,
        preset.taper_end,
    )


def test_source_rejects_bad_specs(tmp_path):
    with pytest.raises(ValueError, match="hf:PATH"):
        HFSource.parse(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        HFSource.parse(f"hf:{tmp_path}")
    path = save_checkpoint_dir("gpt2", tmp_path / "model")
    assert HFSource.parse(f"hf:{path}", VOCAB).max_seq_len == 64
    with pytest.raises(ValueError, match="embeds only"):
        HFSource.parse(f"hf:{path}", VOCAB + 1)


@pytest.mark.parametrize("world", [1, 3])
@given(batch_size=st.integers(1, 8), context=st.integers(1, 64), batch_tokens=st.integers(1, 10_000))
def test_batch_tokens_sets_accumulation_to_reach_the_global_token_batch(world, batch_size, context, batch_tokens):
    config = TrainConfig(batch_size=batch_size, batch_tokens=batch_tokens).with_accumulation(context, world)
    per_step = batch_size * context * world
    assert config.grad_accum * per_step >= batch_tokens > (config.grad_accum - 1) * per_step
