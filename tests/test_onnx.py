"""ONNX export with a dynamic KV cache, and ONNX Runtime decoding against eager PyTorch.

Exports are slow (seconds each), so every exported file is built once per module
and shared. Tolerance: the ORT graph runs the same float32 math in another order
(fused Attention, folded weights), so logits agree to 1e-4 absolute on logits of
magnitude ~10; greedy tokens must agree exactly.
"""

from __future__ import annotations

import collections

import onnx
import onnxruntime as ort
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from taperfx.errors import BadInput
from taperfx.export import (
    OnnxDecoder,
    decoder_program,
    export_onnx,
    ort_device_available,
    read_metadata,
    weights_fingerprint,
)
from taperfx.models import generate

pytestmark = pytest.mark.slow  # every test exports to ONNX or shares the exports (10-20 s each)

LOGITS_ATOL = 1e-4
NORM_OPS = {"llama": "RMSNormalization", "gpt2": "LayerNormalization"}

VARIANTS = {  # name: (arch, taper mode, gate)
    "llama-baseline": ("llama", None, 0.0),
    "gpt2-baseline": ("gpt2", None, 0.0),
    "llama-internal": ("llama", "internal", 0.0),
    "gpt2-internal": ("gpt2", "internal", 0.0),
    "llama-all": ("llama", "all", 0.0),
    "gpt2-half-gate": ("gpt2", "internal", 0.5),
}


@pytest.fixture(scope="module")
def exported(make_decoder, tmp_path_factory):
    """Lazily export each variant once: name -> (model, path to model.onnx)."""
    cache = {}

    def get(name):
        if name not in cache:
            model = make_decoder(*VARIANTS[name])
            cache[name] = model, export_onnx(model, tmp_path_factory.mktemp(name))
        return cache[name]

    return get


def op_counts(path) -> collections.Counter:
    return collections.Counter(node.op_type for node in onnx.load(str(path)).graph.node)


def opset(path) -> int:
    return next(o.version for o in onnx.load(str(path)).opset_import if o.domain in ("", "ai.onnx"))


@pytest.mark.parametrize("name", ["llama-baseline", "gpt2-internal"])
def test_export_is_a_checked_decoder_with_dynamic_cache(exported, name):
    model, path = exported(name)
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    n = model.config.n_layers
    inputs = {i.name: i.type.tensor_type.shape.dim for i in proto.graph.input}
    outputs = [o.name for o in proto.graph.output]
    assert list(inputs) == ["input_ids", "position_ids"] + [
        f"past_key_values.{i}.{kv}" for i in range(n) for kv in ("key", "value")
    ]
    assert outputs == ["logits"] + [f"present.{i}.{kv}" for i in range(n) for kv in ("key", "value")]
    present = next(o.type.tensor_type.shape.dim for o in proto.graph.output if o.name == "present.0.key")
    assert [d.dim_param for d in inputs["input_ids"]] == ["batch", "sequence"]
    assert [d.dim_param or d.dim_value for d in inputs["past_key_values.0.key"]] == [
        "batch",
        model.config.n_heads,
        "past_sequence",
        model.config.head_dim,
    ]
    assert present[2].dim_param == "past_sequence + sequence"


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_baseline_keeps_onnx_normalization_ops(exported, arch):
    model, path = exported(f"{arch}-baseline")
    n_norms = 2 * model.config.n_layers + 1
    assert op_counts(path)[NORM_OPS[arch]] == n_norms
    assert opset(path) == (23 if arch == "llama" else 18)


@pytest.mark.parametrize("name", ["llama-internal", "gpt2-internal", "llama-all"])
def test_folded_export_has_no_norm_in_tapered_layers(exported, name):
    arch, mode, _ = VARIANTS[name]
    _, path = exported(name)
    anchors = 1 if mode == "internal" else 0  # the final norm stays a real norm under Internal-Taper
    assert op_counts(path)[NORM_OPS[arch]] == anchors


def test_gate_between_zero_and_one_exports_unfolded(exported):
    model, path = exported("gpt2-half-gate")
    assert op_counts(path)["LayerNormalization"] == 2 * model.config.n_layers + 1
    ids = torch.randint(0, model.config.vocab_size, (2, 7))
    with torch.no_grad():
        want, _ = model(ids)
    got, _ = OnnxDecoder(path)(ids, torch.arange(7).expand(2, 7))
    torch.testing.assert_close(got, want, atol=LOGITS_ATOL, rtol=0)


@pytest.mark.parametrize("name", ["llama-baseline", "gpt2-baseline", "llama-internal", "gpt2-internal", "llama-all"])
def test_ort_greedy_decoding_matches_eager(exported, name):
    model, path = exported(name)
    prompt = torch.randint(0, model.config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(1))
    want = generate(model, prompt, 16)
    got = generate(OnnxDecoder(path), prompt, 16)
    assert torch.equal(got, want)


@given(batch=st.integers(1, 3), prompt_len=st.integers(1, 12), steps=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_ort_logits_match_eager_for_any_batch_prompt_and_past(exported, batch, prompt_len, steps, seed):
    model, path = exported("llama-internal")
    decoder = OnnxDecoder(path)
    ids = torch.randint(
        0, model.config.vocab_size, (batch, prompt_len + steps), generator=torch.Generator().manual_seed(seed)
    )
    positions = torch.arange(prompt_len + steps).expand(batch, -1)
    eager_cache = ort_cache = None
    for start, stop in [(0, prompt_len), *((t, t + 1) for t in range(prompt_len, prompt_len + steps))]:
        with torch.no_grad():
            want, eager_cache = model(ids[:, start:stop], positions[:, start:stop], eager_cache)
        got, ort_cache = decoder(ids[:, start:stop], positions[:, start:stop], ort_cache)
        torch.testing.assert_close(got, want, atol=LOGITS_ATOL, rtol=0)


def test_cache_stays_in_ort_values_between_steps(exported):
    model, path = exported("gpt2-internal")
    decoder = OnnxDecoder(path)
    _, cache = decoder(torch.zeros(1, 5, dtype=torch.long), torch.arange(5)[None])
    _, cache = decoder(torch.zeros(1, 1, dtype=torch.long), torch.tensor([[5]]), cache)
    assert len(cache) == 2 * model.config.n_layers
    assert all(isinstance(v, ort.OrtValue) for v in cache)
    assert cache[0].shape() == [1, model.config.n_heads, 6, model.config.head_dim]


def test_metadata_names_the_source_model(exported, make_decoder):
    model, path = exported("llama-internal")
    config, fingerprint = read_metadata(path)
    assert config == model.config
    assert fingerprint == weights_fingerprint(model)
    assert fingerprint != weights_fingerprint(make_decoder("llama", "internal", seed=1))


def test_exported_program_source_exports(make_decoder, tmp_path):
    model = make_decoder("gpt2")
    path = export_onnx(decoder_program(model), tmp_path)
    config, _ = read_metadata(path)
    assert config is None  # a bare program carries no model config
    ids = torch.randint(0, model.config.vocab_size, (1, 4))
    assert torch.equal(generate(OnnxDecoder(path), ids, 6), generate(model, ids, 6))


def test_bad_inputs_are_refused(exported, tmp_path):
    _, path = exported("llama-baseline")
    with pytest.raises(ValueError, match="device"):
        OnnxDecoder(path, device="tpu")
    with pytest.raises(ValueError, match="batch, seq"):
        OnnxDecoder(path)(torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.long))
    plain = onnx.helper.make_model(
        onnx.helper.make_graph(
            [onnx.helper.make_node("Identity", ["x"], ["y"])],
            "g",
            [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
            [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
        )
    )
    onnx.save(plain, tmp_path / "plain.onnx")
    with pytest.raises(ValueError, match="not written by taperfx"):
        read_metadata(tmp_path / "plain.onnx")
    with pytest.raises(ValueError, match="not a taperfx decoder"):
        OnnxDecoder(tmp_path / "plain.onnx")


@pytest.mark.skipif(not ort_device_available("cuda"), reason="onnxruntime-gpu (CUDAExecutionProvider) is not installed")
def test_cuda_provider_greedy_matches_eager(exported):
    model, path = exported("llama-internal")
    prompt = torch.randint(0, model.config.vocab_size, (2, 6))
    assert torch.equal(generate(OnnxDecoder(path, device="cuda"), prompt, 12), generate(model, prompt, 12))


def test_cuda_without_provider_is_a_clear_error(exported):
    if ort_device_available("cuda"):
        pytest.skip("CUDAExecutionProvider is installed; the error path cannot be reached")
    with pytest.raises(BadInput, match="onnxruntime-gpu"):
        OnnxDecoder(exported("llama-baseline")[1], device="cuda")
