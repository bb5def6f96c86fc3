"""``taperfx generate`` and ``taperfx export onnx`` on a tiny gate-zero checkpoint with a real tokenizer."""

from __future__ import annotations

import json
import random
import shutil

import pytest
import sentencepiece as spm
import torch

from taperfx.cli import main
from taperfx.export import export_onnx
from taperfx.models import generate
from taperfx.train.checkpoint import load_model, save_checkpoint

WORDS = "the a cat dog bird sat ran flew on under over mat tree house little big red happy".split()


def sentences(n: int, seed: int = 0):
    rng = random.Random(seed)
    return (" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 10))) for _ in range(n))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, make_decoder):
    root = tmp_path_factory.mktemp("run")
    spm.SentencePieceTrainer.train(
        sentence_iterator=sentences(400),
        model_prefix=str(root / "tok"),
        vocab_size=60,
        model_type="bpe",
        hard_vocab_limit=False,
        minloglevel=2,
    )
    tokenizer = spm.SentencePieceProcessor(model_file=str(root / "tok.model"))
    model = make_decoder("llama", "internal", gate=0.0, vocab_size=tokenizer.vocab_size())
    meta = {"model": model.config.to_dict(), "protocol": "internal"}
    return save_checkpoint(root, 1, model, meta, root / "tok.model")


@pytest.fixture(scope="module")
def exported_onnx(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx")
    assert main(["export", "onnx", str(checkpoint), "-o", str(out)]) == 0
    return out / "model.onnx"


def run_generate(capsys, *args):
    code = main(["generate", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def expected_text(checkpoint, prompt: str, new_tokens: int) -> str:
    """What greedy decoding must print: eager generation, cut at end-of-sequence, detokenized."""
    model, meta = load_model(checkpoint)
    tokenizer = spm.SentencePieceProcessor(model_file=meta["tokenizer_path"])
    ids = tokenizer.encode(prompt)
    new = generate(model, torch.tensor([ids]), new_tokens)[0, len(ids) :].tolist()
    if tokenizer.eos_id() in new:
        new = new[: new.index(tokenizer.eos_id())]
    return tokenizer.decode(new)


def test_eager_streams_text_and_reports_speed(checkpoint, capsys):
    code, out, err = run_generate(capsys, checkpoint, "--prompt", "the cat sat", "--max-new-tokens", 12)
    want = expected_text(checkpoint, "the cat sat", 12)
    assert code == 0 and want, "the tiny model must produce some text for this test to mean anything"
    assert out.rstrip("\n") == want
    assert "tokens/s" in err and "[eager]" in err


@pytest.mark.slow  # ONNX export or torch.compile (20-50 s)
@pytest.mark.parametrize("backend", ["onnx", "compile"])
def test_backends_print_what_eager_prints(checkpoint, exported_onnx, capsys, backend):
    extra = ["--onnx", exported_onnx] if backend == "onnx" else []
    code, out, _ = run_generate(
        capsys, checkpoint, "--prompt", "a dog ran", "--max-new-tokens", 10, "--backend", backend, *extra
    )
    assert code == 0
    assert out.rstrip("\n") == expected_text(checkpoint, "a dog ran", 10)


def test_a_folded_checkpoint_directory_generates_what_its_source_generates(checkpoint, tmp_path, capsys):
    folded = tmp_path / "folded"
    assert main(["fold", str(checkpoint), "-o", str(folded)]) == 0
    capsys.readouterr()
    code, out, err = run_generate(capsys, folded, "--prompt", "the cat sat", "--max-new-tokens", 12)
    assert code == 0 and out.rstrip("\n") == expected_text(checkpoint, "the cat sat", 12)
    assert "[eager]" in err


@pytest.mark.slow  # ONNX export (20-50 s)
def test_a_folded_checkpoint_directory_exports_to_onnx_and_decodes_the_same_text(checkpoint, tmp_path, capsys):
    folded, onnx_dir = tmp_path / "folded", tmp_path / "onnx"
    assert main(["fold", str(checkpoint), "-o", str(folded)]) == 0
    assert main(["export", "onnx", str(folded), "-o", str(onnx_dir)]) == 0
    capsys.readouterr()
    args = ("--prompt", "a dog ran", "--max-new-tokens", 10, "--backend", "onnx", "--onnx", onnx_dir / "model.onnx")
    code, out, _ = run_generate(capsys, folded, *args)
    assert code == 0 and out.rstrip("\n") == expected_text(checkpoint, "a dog ran", 10)


def test_sampling_is_reproducible_with_a_seed(checkpoint, capsys):
    args = (checkpoint, "--prompt", "the bird", "--max-new-tokens", 12, "--temperature", 1.0, "--top-k", 8, "--seed", 3)
    assert run_generate(capsys, *args)[1] == run_generate(capsys, *args)[1]


@pytest.mark.slow  # ONNX export or torch.compile (20-50 s)
def test_onnx_file_of_another_model_is_refused(checkpoint, make_decoder, tmp_path, capsys):
    model, _ = load_model(checkpoint)
    other = export_onnx(make_decoder("llama", "internal", vocab_size=model.config.vocab_size, seed=1), tmp_path)
    code, _, err = run_generate(capsys, checkpoint, "--prompt", "the cat", "--backend", "onnx", "--onnx", other)
    assert code == 2 and "error[onnx-other-weights]" in err


def test_checkpoint_without_tokenizer_is_refused(checkpoint, tmp_path, capsys):
    broken = shutil.copytree(checkpoint, tmp_path / "ckpt")
    (broken / json.loads((broken / "config.json").read_text())["tokenizer"]).unlink()
    code, _, err = run_generate(capsys, broken, "--prompt", "the cat")
    assert code == 2 and "error[not-found]" in err


def test_tokenizer_that_is_not_sentencepiece_is_refused(checkpoint, tmp_path, capsys):
    broken = shutil.copytree(checkpoint, tmp_path / "ckpt")
    (broken / json.loads((broken / "config.json").read_text())["tokenizer"]).write_text("{}")
    code, _, err = run_generate(capsys, broken, "--prompt", "the cat")
    assert code == 3 and "error[not-sentencepiece]" in err


def test_prompt_longer_than_context_is_refused(checkpoint, capsys):
    code, _, err = run_generate(capsys, checkpoint, "--prompt", " ".join(sentences(20)), "--max-new-tokens", 4)
    assert code == 2 and "error[prompt-too-long]" in err


def test_unknown_backend_is_refused(checkpoint, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", str(checkpoint), "--prompt", "x", "--backend", "tensorrt"])
    assert exit_info.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_export_refuses_a_file_that_is_not_a_program(tmp_path, capsys):
    (tmp_path / "model.bin").write_bytes(b"")
    code = main(["export", "onnx", str(tmp_path / "model.bin"), "-o", str(tmp_path / "out")])
    assert code == 2 and "error[bad-source]" in capsys.readouterr().err
