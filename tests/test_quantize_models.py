"""Quantizing whole models, written the way users write them: reference decoders (folded), nn.Sequential,
nn.TransformerEncoder, transformers GPT-2; the eager, torch.compile, ExportedProgram and ONNX paths agree."""

import collections

import onnx
import pytest
import torch

import taperfx
import taperfx.quantize as tq
from taperfx.export.ort_decoder import OnnxDecoder
from taperfx.export.program import decoder_program, load_program
from taperfx.export.program_decoder import ProgramDecoder
from taperfx.export.quantized import QUANTIZATION_KEY, export_onnx_quantized
from taperfx.quantize.modules import QuantizedEmbedding, QuantizedLinear


@pytest.fixture(scope="module")
def folded():
    """A gate-zero Internal-Taper llama with its norms folded (eager), tied embeddings like the demo's."""
    from taperfx.models import ModelConfig, build_model

    torch.manual_seed(0)
    config = ModelConfig(arch="llama", vocab_size=96, dim=64, n_layers=2, n_heads=4, max_seq_len=48)
    model = taperfx.convert(build_model(config), "internal")
    model.train()(torch.randint(0, 96, (2, 16)))
    taperfx.start_taper(model)
    taperfx.set_gate(model, 0.0)
    ids = torch.randint(0, 96, (1, 8))
    return taperfx.fold_module(model.eval(), (ids,), guard_calls=False)[0]


def _ids(seed=1, batch=2, seq=12, vocab=96):
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("config", [tq.Int4WeightOnly(), tq.Int8WeightOnly()], ids=lambda c: c.name)
def test_decoder_head_is_untied_and_the_gather_stays_exact(folded, config):
    quantized, report = tq.quantize_with_report(folded, config)
    assert isinstance(quantized.output, QuantizedLinear) and isinstance(quantized.tok_embeddings, torch.nn.Embedding)
    assert torch.equal(quantized.tok_embeddings.weight, folded.tok_embeddings.weight)
    assert folded.output.weight is folded.tok_embeddings.weight  # the input is untouched
    assert len(report.quantized) == 7 * 2 + 1 and report.kept == []
    agreement = tq.agreement(folded, quantized, _ids())
    bound = 0.2 if isinstance(config, tq.Int4WeightOnly) else 0.02  # measured 0.09 / 0.008 (rms / logit rms)
    assert agreement.rms_error < bound and agreement.top1 >= 0.9 and agreement.positions == 24


def test_head_false_and_embedding_true(folded):
    kept, report = tq.quantize_with_report(folded, tq.Int8WeightOnly(head=False))
    assert isinstance(kept.output, torch.nn.Linear) and kept.output.weight is kept.tok_embeddings.weight
    assert report.kept == [("output", "output head (head=False)")]
    both = tq.quantize(folded, tq.Int4WeightOnly(group_size=64, embedding=True))
    assert isinstance(both.tok_embeddings, QuantizedEmbedding) and isinstance(both.output, QuantizedLinear)
    assert tq.agreement(folded, both, _ids()).top1 >= 0.9


@pytest.mark.parametrize(
    "config", [tq.Int4WeightOnly(group_size=32, embedding=True), tq.Int8WeightOnly(head=False)], ids=str
)
def test_program_path_equals_the_module_path_and_survives_save_load(folded, config, tmp_path):
    quantized = tq.quantize(folded, config)
    program, report = tq.quantize_with_report(decoder_program(folded), config)
    ops = collections.Counter(str(n.target) for n in program.graph.nodes if n.op == "call_function")
    linears = 15 if config.head else 14
    assert ops["aten.linear.default"] == 15 - linears
    assert sum(v for k, v in ops.items() if k.startswith("taperfx.linear_")) == linears
    assert ops["taperfx.embedding_int4.default"] == (1 if config.embedding else 0)
    torch.export.save(program, tmp_path / "q.pt2")
    loaded = ProgramDecoder(load_program(tmp_path / "q.pt2")[0])
    ids = _ids(2)
    want = quantized(ids)[0]
    torch.testing.assert_close(loaded(ids, torch.arange(12).expand(2, 12))[0], want, rtol=0, atol=0)
    # and decoding through the KV cache gives the eager model's tokens
    assert torch.equal(taperfx.models.generate(loaded, ids, 6), taperfx.models.generate(quantized, ids, 6))


@pytest.mark.slow
def test_compiled_quantized_module_matches_eager(folded):
    quantized = tq.quantize(folded, tq.Int4WeightOnly())
    ids = _ids(3)
    want = quantized(ids)[0]
    got = torch.compile(quantized)(ids)[0]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4 * want.abs().max().item())


@pytest.mark.slow
@pytest.mark.parametrize("config", [tq.Int4WeightOnly(), tq.Int8WeightOnly(head=False)], ids=str)
def test_onnx_quantized_runs_in_ort_and_agrees_with_torch(folded, config, tmp_path):
    path = export_onnx_quantized(folded, tmp_path / "onnx", config)
    model = onnx.load(str(path))
    ops = collections.Counter(n.op_type for n in model.graph.node)
    # the tied head is untied and quantized too, unless head=False keeps it fp32
    assert (ops["MatMulNBits"], ops["MatMul"]) == ((15, 0) if config.head else (14, 1))
    assert {p.key: p.value for p in model.metadata_props}[QUANTIZATION_KEY] == config.name
    decoder = OnnxDecoder(path)
    vs_float = tq.agreement(folded, decoder, _ids())
    vs_torch = tq.agreement(tq.quantize(folded, config), decoder, _ids())
    # Measured on this model: ORT int4 0.12 / int8 0.009 of the logit rms from float; different rounding
    # (ORT's own scales, int8 activations at accuracy level 4) from torch's quantized model.
    bound = 0.25 if isinstance(config, tq.Int4WeightOnly) else 0.03
    assert vs_float.rms_error < bound and vs_float.top1 >= 0.9
    assert vs_torch.rms_error < 1.5 * bound


def test_sequential_and_transformer_encoder():
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(48, 100), torch.nn.GELU(), torch.nn.Linear(100, 10))
    x = torch.randn(4, 48)
    quantized = tq.quantize(mlp, tq.Int4WeightOnly(group_size=32))
    assert all(isinstance(quantized[i], QuantizedLinear) for i in (0, 2))
    assert (quantized(x) - mlp(x)).pow(2).mean().sqrt() < 0.1 * mlp(x).pow(2).mean().sqrt()

    layer = torch.nn.TransformerEncoderLayer(64, 4, dim_feedforward=128, batch_first=True, norm_first=True)
    encoder = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    quantized, report = tq.quantize_with_report(encoder, tq.Int8WeightOnly())
    assert [name for name, _ in report.kept] == ["layers.0.self_attn.out_proj", "layers.1.self_attn.out_proj"]
    assert len(report.quantized) == 4
    x = torch.randn(2, 10, 64)
    want = encoder(x)
    assert (quantized(x) - want).pow(2).mean().sqrt() < 0.02 * want.pow(2).mean().sqrt()
    # the layer's fused fast path reads linear1.weight: the kernel's own (dequantized) weight
    linear1, original = quantized.layers[0].linear1, encoder.layers[0].linear1
    deq = taperfx.quantize.ops.dequantize_int8(original.weight)
    assert (linear1.weight - deq).abs().max() <= 2.0**-8 * deq.abs().max()


def test_transformers_gpt2_conv1d():
    hf_tiny = pytest.importorskip("helpers.hf_tiny")
    model = hf_tiny.hf_model("gpt2")
    quantized, report = tq.quantize_with_report(model, tq.Int4WeightOnly())
    assert len(report.quantized) == 2 * 4 + 1  # c_attn, c_proj, c_fc, mlp c_proj per layer, and lm_head
    ids = _ids(4, vocab=hf_tiny.VOCAB)
    want, got = model(ids).logits.double(), quantized(ids).logits.double()
    assert (got - want).pow(2).mean().sqrt() < 0.2 * want.pow(2).mean().sqrt()
    assert (got.argmax(-1) == want.argmax(-1)).double().mean() >= 0.9


@pytest.mark.cuda
def test_cuda_programs_are_refused():
    model = taperfx.models.build_model(taperfx.models.ModelConfig(dim=32, n_heads=2, n_layers=1)).cuda().eval()
    with pytest.raises(tq.UnsupportedDevice) as err:
        tq.quantize(decoder_program(model), tq.Int8WeightOnly())
    assert err.value.code == "quantize-unsupported-device"


@pytest.mark.cuda
@pytest.mark.parametrize("config", [tq.Int4WeightOnly(group_size=64), tq.Int8WeightOnly()], ids=lambda c: c.name)
def test_cuda_modules_go_through_torchao(folded, config):
    model = folded.cuda().to(torch.bfloat16)
    quantized, report = tq.quantize_with_report(model, config)
    assert report.quantized_bytes < report.float_bytes
    agreement = tq.agreement(model, quantized, _ids().cuda())
    assert agreement.top1 >= 0.9
