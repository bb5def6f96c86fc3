"""Data preparation: corpus, input formats, restartable stages, token windows, clear errors."""

import json

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from taperfx.train.corpus import synthetic_stories
from taperfx.train.prepare import prepare_data, read_documents
from taperfx.train.tokens import TokenStream, open_data


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return prepare_data(tmp_path_factory.mktemp("data") / "d", n_stories=200, vocab_size=320)


def test_synthetic_corpus_is_deterministic_and_varied():
    a = list(synthetic_stories(300, seed=1))
    assert a == list(synthetic_stories(300, seed=1))
    assert a != list(synthetic_stories(300, seed=2))
    assert len(set(a)) == 300
    assert len({len(s.split(". ")) for s in a}) > 3  # the structure varies, not only the names


def test_input_formats(tmp_path):
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("First story.\nIt has two lines.\n<|endoftext|>\nSecond story.\n<|endoftext|>\n\n")
    lines = tmp_path / "lines.txt"
    lines.write_text("doc one\n\ndoc two\n")
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text(json.dumps({"body": "json doc"}) + "\n\n" + json.dumps({"body": "another"}) + "\n")
    assert list(read_documents(tiny)) == ["First story.\nIt has two lines.", "Second story."]
    assert list(read_documents(lines)) == ["doc one", "doc two"]
    assert list(read_documents(jsonl, text_field="body")) == ["json doc", "another"]
    with pytest.raises(ValueError, match="docs.jsonl:1: expected a JSON object with a 'text'"):
        list(read_documents(jsonl))


def test_prepared_directory_round_trips_text(prepared):
    import sentencepiece as spm

    data = open_data(prepared)
    sp = spm.SentencePieceProcessor(model_file=str(data.tokenizer_path))
    train = np.fromfile(prepared / "train.bin", dtype=data.meta["dtype"])
    val = np.fromfile(prepared / "val.bin", dtype=data.meta["dtype"])
    assert data.meta["tokens"] == {"train": train.size, "val": val.size}
    assert data.meta["documents"]["val"] == 10  # every 20th of 200 documents (val_fraction 0.05)
    first_doc = train[: int(np.argmax(train == data.meta["eos_id"]))]
    assert sp.decode(first_doc.tolist()) == list(synthetic_stories(200))[1]  # document 0 is held out
    assert train.max() < data.vocab_size


def test_restart_skips_finished_stages_and_redoes_unfinished(prepared):
    tokenizer_mtime = (prepared / "tokenizer.model").stat().st_mtime_ns
    train_bytes = (prepared / "train.bin").read_bytes()
    (prepared / "meta.json").unlink()  # as if interrupted during tokenization
    prepare_data(prepared, n_stories=200, vocab_size=320)
    assert (prepared / "tokenizer.model").stat().st_mtime_ns == tokenizer_mtime
    assert (prepared / "train.bin").read_bytes() == train_bytes
    assert (prepared / "meta.json").is_file()
    assert not [p.name for p in prepared.iterdir() if p.name.startswith(".")]  # no temporary left over


def test_different_settings_for_an_existing_directory_are_refused(prepared):
    with pytest.raises(ValueError, match="prepared with different settings"):
        prepare_data(prepared, n_stories=200, vocab_size=400)


def test_empty_corpus_is_refused_and_writes_nothing(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(ValueError, match="corpus is empty"):
        prepare_data(tmp_path / "out", [empty])
    assert not (tmp_path / "out").exists()


def test_missing_tokenizer_is_named(prepared, tmp_path):
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("meta.json", "train.bin", "val.bin"):
        (copy / name).write_bytes((prepared / name).read_bytes())
    with pytest.raises(FileNotFoundError, match="tokenizer .*tokenizer.model is missing"):
        open_data(copy)


def test_context_longer_than_the_data_is_refused(prepared):
    n = open_data(prepared).meta["tokens"]["val"]
    with pytest.raises(ValueError, match=f"holds {n} tokens, fewer than context"):
        open_data(prepared).stream("val", n)


@given(context=st.integers(1, 64), batch=st.integers(1, 8), seed=st.integers(0, 2**31))
def test_windows_are_contiguous_and_targets_shift_by_one(prepared, context, batch, seed):
    data = open_data(prepared)
    stream = data.stream("train", context)
    x, y = stream.sample(batch, torch.Generator().manual_seed(seed))
    assert x.shape == y.shape == (batch, context) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    tokens = torch.from_numpy(np.asarray(stream.tokens, dtype=np.int64))
    starts = torch.randint(0, len(tokens) - context, (batch,), generator=torch.Generator().manual_seed(seed))
    for row_x, row_y, start in zip(x, y, starts.tolist()):
        assert torch.equal(row_x, tokens[start : start + context])
        assert torch.equal(row_y, tokens[start + 1 : start + context + 1])


def test_evaluation_batches_are_fixed(prepared):
    stream = TokenStream(prepared / "val.bin", open_data(prepared).meta["dtype"], 16)
    first = [x for x, _ in stream.evaluation_batches(4, 3)]
    second = [x for x, _ in stream.evaluation_batches(4, 3)]
    assert len(first) == 3 and all(torch.equal(a, b) for a, b in zip(first, second))
