"""``prepare_data``: text files → SentencePiece tokenizer → memory-mapped token streams.

A prepared directory holds::

    prepare.json     the settings it was prepared with (a restart must use the same)
    corpus.txt       only for the embedded synthetic corpus: one story per line
    tokenizer.model  SentencePiece model (+ tokenizer.vocab)
    train.bin        token ids, raw little-endian uint16 (uint32 above 65536 pieces),
    val.bin          documents joined with the EOS id; every k-th document is held out
    meta.json        dtype, token counts, vocabulary size: written last, marks completion

Each stage writes under a temporary name and renames, and is skipped when its
output already exists, so an interrupted ``prepare`` picks up where it stopped.

Inputs: TinyStories-style .txt (stories separated by ``<|endoftext|>`` lines),
one-document-per-line .txt, or .jsonl with a text field.
"""

from __future__ import annotations

import itertools
import json
import os
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import sentencepiece as spm

from taperfx.train.atomic import temporary_path, write_text_atomic
from taperfx.train.corpus import LABEL, synthetic_stories

__all__ = ["prepare_data", "read_documents", "DOC_SEPARATOR"]

DOC_SEPARATOR = "<|endoftext|>"
_ENCODE_CHUNK = 2048


def _separated_documents(lines: Iterable[str]) -> Iterator[str]:
    doc: list[str] = []
    for line in lines:
        if line.strip() == DOC_SEPARATOR:
            if any(s.strip() for s in doc):
                yield "".join(doc).strip()
            doc = []
        else:
            doc.append(line)
    if any(s.strip() for s in doc):
        yield "".join(doc).strip()


def read_documents(path: str | os.PathLike, text_field: str = "text") -> Iterator[str]:
    """The documents of one input file, streamed (see the module docstring for formats)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"input file {path} does not exist")
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)[text_field]
                except (json.JSONDecodeError, KeyError, TypeError) as exc:
                    raise ValueError(
                        f"{path}:{lineno}: expected a JSON object with a {text_field!r} string ({exc})"
                    ) from exc
                if text.strip():
                    yield text.strip()
        return
    with path.open(encoding="utf-8") as f:
        separated = DOC_SEPARATOR in f.read(1 << 20)
    with path.open(encoding="utf-8") as f:
        if separated:
            yield from _separated_documents(f)
        else:
            yield from (line.strip() for line in f if line.strip())


def _documents(sources: list[Path], text_field: str) -> Iterator[str]:
    for source in sources:
        yield from read_documents(source, text_field)


def _train_tokenizer(out: Path, docs: Iterator[str], vocab_size: int, sample_bytes: int) -> None:
    def sentences() -> Iterator[str]:
        seen = 0
        for doc in docs:
            for line in doc.splitlines():
                if line.strip():
                    seen += len(line)
                    yield line
            if seen >= sample_bytes:
                return

    with tempfile.TemporaryDirectory(dir=out) as tmp:
        prefix = Path(tmp) / "tokenizer"
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences(),
            model_prefix=str(prefix),
            vocab_size=vocab_size,
            model_type="bpe",
            hard_vocab_limit=False,  # small corpora may not support the full size; take what they do
            num_threads=os.cpu_count() or 1,
            max_sentence_length=1 << 16,
            minloglevel=2,
        )
        for ext in ("vocab", "model"):  # the .model last: its presence marks the stage done
            Path(f"{prefix}.{ext}").replace(out / f"tokenizer.{ext}")


def _tokenize(out: Path, docs: Iterator[str], val_every: int) -> dict:
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    dtype = np.uint16 if sp.get_piece_size() <= 1 << 16 else np.uint32
    eos = sp.eos_id()
    finals = {split: out / f"{split}.bin" for split in ("train", "val")}
    tmps = {split: temporary_path(final) for split, final in finals.items()}
    counts = {"train": 0, "val": 0}
    n_docs = {"train": 0, "val": 0}
    try:
        with tmps["train"].open("wb") as train_f, tmps["val"].open("wb") as val_f:
            files = {"train": train_f, "val": val_f}
            index = 0
            while chunk := list(itertools.islice(docs, _ENCODE_CHUNK)):
                pieces: dict[str, list[int]] = {"train": [], "val": []}
                for ids in sp.encode(chunk, num_threads=os.cpu_count() or 1):
                    split = "val" if index % val_every == 0 else "train"
                    pieces[split] += [*ids, eos]
                    n_docs[split] += 1
                    index += 1
                for split, tokens in pieces.items():  # one write per chunk and split
                    np.asarray(tokens, dtype=dtype).tofile(files[split])
                    counts[split] += len(tokens)
        for split in ("train", "val"):
            tmps[split].replace(finals[split])
    finally:
        for tmp in tmps.values():
            tmp.unlink(missing_ok=True)
    return {
        "dtype": np.dtype(dtype).name,
        "vocab_size": sp.get_piece_size(),
        "eos_id": eos,
        "tokens": counts,
        "documents": n_docs,
    }


def prepare_data(
    out_dir: str | os.PathLike,
    inputs: Iterable[str | os.PathLike] = (),
    *,
    vocab_size: int = 4096,
    val_fraction: float = 0.05,
    text_field: str = "text",
    n_stories: int = 12000,
    seed: int = 0,
    tokenizer_sample_mb: float = 200.0,
) -> Path:
    """Prepare ``out_dir`` for training and return it; with no ``inputs``, the synthetic corpus.

    ``val_fraction`` of the documents (every k-th one) is held out. The tokenizer is
    trained on at most ``tokenizer_sample_mb`` of text from the start of the inputs.
    Re-running on a finished or interrupted directory resumes; different settings
    for an existing directory are refused rather than silently mixed.
    """
    if vocab_size < 16:
        raise ValueError(f"vocab_size must be at least 16, got {vocab_size}")
    if not 0.0 < val_fraction <= 0.5:
        raise ValueError(f"val_fraction must lie in (0, 0.5], got {val_fraction}")
    sources = [Path(p).resolve() for p in inputs]
    for source in sources:
        if not source.is_file():
            raise FileNotFoundError(f"input file {source} does not exist")
    if sources and next(_documents(sources, text_field), None) is None:
        raise ValueError(f"no text found in {[str(s) for s in sources]}: the corpus is empty")

    settings = {
        "inputs": [str(s) for s in sources] or None,
        "corpus": LABEL if not sources else "user files",
        "vocab_size": vocab_size,
        "val_fraction": val_fraction,
        "text_field": text_field,
        "n_stories": n_stories if not sources else None,
        "seed": seed,
        "tokenizer_sample_mb": tokenizer_sample_mb,
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    recorded = out / "prepare.json"
    if recorded.is_file() and json.loads(recorded.read_text()) != settings:
        raise ValueError(f"{out} was prepared with different settings ({recorded}); use a new directory")
    write_text_atomic(recorded, json.dumps(settings, indent=2) + "\n")

    if not sources:
        corpus = out / "corpus.txt"
        if not corpus.is_file():
            write_text_atomic(corpus, "".join(f"{s}\n" for s in synthetic_stories(n_stories, seed)))
        sources = [corpus]
    if not (out / "tokenizer.model").is_file():
        _train_tokenizer(out, _documents(sources, text_field), vocab_size, int(tokenizer_sample_mb * 1e6))
    if not all((out / f"{s}.bin").is_file() for s in ("train", "val")) or not (out / "meta.json").is_file():
        meta = _tokenize(out, _documents(sources, text_field), max(2, round(1 / val_fraction)))
        meta["corpus"] = settings["corpus"]
        write_text_atomic(out / "meta.json", json.dumps(meta, indent=2) + "\n")
    return out
