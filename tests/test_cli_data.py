"""``taperfx data prepare`` from the command line: refusals, byte fallback, splits, resumable stages (issue 14)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import sentencepiece as spm

from taperfx.cli import main
from taperfx.train.corpus import synthetic_stories
from taperfx.train.prepare import prepare_data

PROSE = [
    "Mr. Knightley, a sensible man about seven or eight-and-thirty, was a very old and intimate friend.",
    "Emma Woodhouse, handsome, clever, and rich, with a comfortable home and happy disposition.",
    "The Queen's Quixotic zeal cost £20 (or 1,000 francs) at Zurich in 1815; Xavier paid [in full].",
] + [f"Chapter {i}: the day was fine, and the walk to Hartfield pleasant." for i in range(60)]


def prepare(tmp_path, *args) -> int:
    return main(["data", "prepare", *map(str, args)])


def error_code(capsys) -> str:
    """The code of the one-line error that ends stderr (earlier lines may be other tools' progress bars)."""
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err, err
    return err.splitlines()[-1].split("error[", 1)[1].split("]", 1)[0]


@pytest.fixture(scope="module")
def prose(tmp_path_factory):
    path = tmp_path_factory.mktemp("prose") / "emma.txt"
    path.write_text("\n".join(PROSE) + "\n")
    return path


def test_byte_fallback_makes_every_character_representable(prose, tmp_path, capsys):
    out = tmp_path / "d"
    assert prepare(tmp_path, prose, "--out", out, "--vocab-size", "400", "--character-coverage", "0.98") == 0
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    for line in PROSE[:3]:
        ids = sp.encode(line)
        assert sp.unk_id() not in ids and sp.decode(ids) == line
    recorded = json.loads((out / "prepare.json").read_text())
    assert recorded["byte_fallback"] is True and recorded["character_coverage"] == 0.98


def test_without_byte_fallback_rare_characters_are_unknown(prose, tmp_path):
    out = prepare_data(tmp_path / "d", [prose], vocab_size=120, byte_fallback=False, character_coverage=0.98)
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    assert sp.unk_id() in sp.encode("£ [Xavier]")


@pytest.mark.parametrize("vocab, code", [("32000", "vocab-too-large"), ("100", "vocab-too-small")])
def test_an_explicit_vocabulary_the_corpus_cannot_support_is_refused(prose, tmp_path, capsys, vocab, code):
    out = tmp_path / "d"
    assert prepare(tmp_path, prose, "--out", out, "--vocab-size", vocab) == 2
    assert error_code(capsys) == code
    assert not (out / "tokenizer.model").exists() and not (out / "meta.json").exists()


def test_a_default_vocabulary_adapts_and_says_so(prose, tmp_path, capsys):
    out = tmp_path / "d"
    assert prepare(tmp_path, prose, "--out", out) == 0
    vocab = json.loads((out / "meta.json").read_text())["vocab_size"]
    assert vocab < 4096 and f"vocabulary: {vocab} pieces" in capsys.readouterr().out


def test_a_corpus_without_a_training_document_is_refused(tmp_path, capsys):
    one = tmp_path / "one.txt"
    one.write_text("a single document\n")
    assert prepare(tmp_path, one, "--out", tmp_path / "d") == 3
    assert error_code(capsys) == "empty-split"
    assert not (tmp_path / "d").exists()


def test_non_utf8_input_is_named_and_leaves_no_settings(tmp_path, capsys, prose):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("first line\nna\u00efve caf\u00e9\n".encode("latin-1"))
    out = tmp_path / "d"
    assert prepare(tmp_path, bad, "--out", out) == 3
    err = capsys.readouterr().err
    assert "error[not-utf8]" in err and f"{bad}:2:" in err
    assert not out.exists()  # no prepare.json: the corrected command is not refused
    assert prepare(tmp_path, prose, "--out", out, "--vocab-size", "320") == 0


@pytest.mark.slow  # builds a Hugging Face checkpoint and tokenizer
def test_reprepare_with_another_tokenizer_is_refused_both_ways(prose, tmp_path, capsys):
    from helpers.hf_tiny import save_checkpoint_dir

    hf = save_checkpoint_dir("gpt2", tmp_path / "gpt2")
    sentencepiece_dir, hf_dir = tmp_path / "sp", tmp_path / "hf"
    assert prepare(tmp_path, prose, "--out", sentencepiece_dir, "--vocab-size", "320") == 0
    assert prepare(tmp_path, prose, "--out", hf_dir, "--hf-tokenizer", hf) == 0
    before = {d: {p.name: p.read_bytes() for p in d.iterdir()} for d in (sentencepiece_dir, hf_dir)}
    assert prepare(tmp_path, prose, "--out", sentencepiece_dir, "--hf-tokenizer", hf) == 2
    assert error_code(capsys) == "prepared-differently"
    assert prepare(tmp_path, prose, "--out", hf_dir, "--vocab-size", "320") == 2
    assert error_code(capsys) == "prepared-differently"
    assert {d: {p.name: p.read_bytes() for p in d.iterdir()} for d in (sentencepiece_dir, hf_dir)} == before
    assert prepare(tmp_path, prose, "--out", hf_dir, "--hf-tokenizer", hf) == 0  # the same settings resume


def test_tail_split_holds_out_the_last_documents(tmp_path):
    stories = list(synthetic_stories(100))
    out = prepare_data(tmp_path / "d", n_stories=100, vocab_size=320, val_fraction=0.1, split="tail")
    meta = json.loads((out / "meta.json").read_text())
    assert meta["documents"] == {"train": 90, "val": 10}
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    val = np.fromfile(out / "val.bin", dtype=meta["dtype"]).tolist()
    assert sp.decode(val[: val.index(meta["eos_id"])]) == stories[90]


def test_interrupted_prepare_resumes_and_cleans_stale_temporaries(tmp_path, capsys, monkeypatch):
    from taperfx.train import prepare as prepare_module

    out = tmp_path / "d"

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare_module, "_tokenize", interrupted)
    assert prepare(tmp_path, "--out", out, "--stories", "80", "--vocab-size", "320") == 130
    assert str(out) in capsys.readouterr().err
    monkeypatch.undo()
    kept = (out / "tokenizer.model").read_bytes()
    (out / ".train.bin.x1y2z3.bin").write_bytes(b"left by a killed run")
    assert prepare(tmp_path, "--out", out, "--stories", "80", "--vocab-size", "320") == 0
    assert (out / "tokenizer.model").read_bytes() == kept
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []


def test_tokenizer_flags_with_a_hugging_face_tokenizer_are_refused(prose, tmp_path, capsys):
    out = tmp_path / "d"
    assert prepare(tmp_path, prose, "--out", out, "--hf-tokenizer", tmp_path / "gpt2", "--no-byte-fallback") == 2
    assert error_code(capsys) == "conflicting-flags"
    assert not out.exists()
