"""``--quantize`` on the command line, end to end on a tiny trained Internal-Taper run:
fold → .pt2, export onnx, generate from both artefacts, eval before/after; refusals exit 2."""

import json

import onnx
import pytest
import sentencepiece as spm
import torch

import taperfx
from taperfx.cli import main
from taperfx.evaluate import cross_entropy, load_for_eval
from taperfx.export.program import load_program
from taperfx.export.program_decoder import ProgramDecoder
from taperfx.models import generate
from taperfx.train.checkpoint import load_model
from taperfx.train.tokens import open_data

TINY = ["model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.max_seq_len=32", "batch_size=4"]
TINY += ["eval_batches=1", "eval_interval=4", "progress=false", "log_interval=2", "calibration_steps=1"]
EVAL = ["--batch-size", "2", "--batches", "2"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("quantize-cli")
    assert main(["data", "prepare", "--out", str(root / "data"), "--stories", "200", "--vocab-size", "320"]) == 0
    settings = [arg for kv in TINY for arg in ("--set", kv)]
    args = ["--data", str(root / "data"), "--out", str(root / "run"), "--protocol", "internal", "--steps", "8"]
    assert main(["train", *args, *settings]) == 0
    return root


def _folded(run):
    model, _ = load_model(run / "run")
    taperfx.set_gate(model, 0.0)
    return taperfx.fold_module(model, (torch.zeros(1, 4, dtype=torch.long),), guard_calls=False)[0]


@pytest.mark.slow
def test_fold_quantize_writes_a_program_that_decodes_like_the_quantized_module(run, capsys):
    out = run / "int4.pt2"
    assert main(["fold", str(run / "run"), "-o", str(out), "--quantize", "int4:g32"]) == 0
    printed = capsys.readouterr().out
    assert "int4:g32" in printed and "top-1" in printed
    step = ProgramDecoder(load_program(out)[0])
    want = taperfx.quantize(_folded(run), taperfx.Int4WeightOnly(group_size=32))
    ids = torch.randint(0, 320, (2, 10), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(10).expand(2, 10)
    torch.testing.assert_close(step(ids, positions)[0], want(ids)[0], rtol=0, atol=1e-5)

    tokenizer = spm.SentencePieceProcessor(model_file=str(run / "data" / "tokenizer.model"))
    prompt = torch.tensor([tokenizer.encode("Once upon a time")])
    tokens = generate(step, prompt, 8)[0, prompt.shape[1] :].tolist()
    eos = tokenizer.eos_id()
    expected = tokenizer.decode(tokens[: tokens.index(eos)] if eos in tokens else tokens)
    code = main(
        ["generate", str(run / "run"), "--prompt", "Once upon a time", "--program", str(out), "--max-new-tokens", "8"]
    )
    assert code == 0
    assert capsys.readouterr().out.strip() == expected.strip()


@pytest.mark.slow
def test_export_onnx_quantize_and_generate_from_it(run, capsys):
    out = run / "onnx-int8"
    assert main(["export", "onnx", str(run / "run"), "-o", str(out), "--quantize", "int8"]) == 0
    ops = [n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node]
    assert ops.count("MatMulNBits") == 7 * 2 + 1 and "MatMul" not in ops
    capsys.readouterr()
    args = ["--prompt", "Once upon a time", "--backend", "onnx", "--onnx", str(out / "model.onnx")]
    assert main(["generate", str(run / "run"), *args, "--max-new-tokens", "6"]) == 0


@pytest.mark.slow
def test_eval_quantize_reports_cross_entropy_before_and_after(run, capsys):
    assert main(["eval", str(run / "run"), "--data", str(run / "data"), *EVAL, "--quantize", "int8"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    stream = open_data(run / "data").stream("val", 32)
    quantized = load_for_eval(run / "run", quantize=taperfx.Int8WeightOnly())
    assert result["quantize"] == "int8"
    assert result["cross_entropy_quantized"] == pytest.approx(cross_entropy(quantized, stream, 2, 2), rel=1e-9)
    change = (result["cross_entropy_quantized"] - result["cross_entropy"]) / result["cross_entropy"]
    assert result["cross_entropy_change"] == pytest.approx(change)
    assert abs(change) < 0.01 and 0.9 <= result["top1_agreement"] <= 1.0


@pytest.mark.parametrize("scheme", ["int3", "int4:g48", "int4:32"])
def test_unknown_schemes_exit_2_and_write_nothing(run, scheme, capsys):
    out = run / f"bad-{scheme.replace(':', '-')}.pt2"
    assert main(["fold", str(run / "run"), "-o", str(out), "--quantize", scheme]) == 2
    assert not out.exists()
    assert main(["export", "onnx", str(run / "run"), "-o", str(run / "bad-onnx"), "--quantize", scheme]) == 2
    assert not (run / "bad-onnx").exists()


@pytest.mark.slow
def test_bench_decode_quantize_rows_beside_fp32(tmp_path, capsys):
    args = ["bench", "decode", "--preset", "tinystories-64", "--vocab-size", "97", "--max-seq-len", "160", "--quick"]
    args += ["--backend", "eager", "--new-tokens", "3", "--repeats", "2", "--warmup", "0", "--threads", "1"]
    assert main([*args, "--quantize", "int4", "--quantize", "int8", "--out", str(tmp_path), "--stem", "q"]) == 0
    result = json.loads((tmp_path / "q.json").read_text())
    rows = {(r["batch"], r["variant"]): r for r in result["results"]}
    for batch in (1, 4):
        for variant in ("taper-fused", "taper-fused+int4:g32", "taper-fused+int8"):
            row = rows[(batch, variant)]
            assert len(row["seconds"]) == 2 and row["min"] <= row["tokens_per_s"] <= row["max"]
    quantized = rows[(1, "taper-fused+int4:g32")]["tokens_per_s"] / rows[(1, "taper-fused")]["tokens_per_s"]
    assert f"| {quantized:.3f} |" in (tmp_path / "q.md").read_text()  # the ratio column against fp32 fused
    assert main([*args, "--quantize", "int2", "--out", str(tmp_path)]) == 2
