"""``prepare_data``: text files → SentencePiece tokenizer → memory-mapped token streams.

A prepared directory holds::

    prepare.json     the settings it was prepared with (a restart must use the same)
    corpus.txt       only for the embedded synthetic corpus: one story per line
    tokenizer.model  SentencePiece model (+ tokenizer.vocab)
    train.bin        token ids, raw little-endian uint16 (uint32 above 65536 pieces),
    val.bin          documents joined with the EOS id; the held-out split (see ``SPLITS``)
    meta.json        dtype, token counts, vocabulary size: written last, marks completion

Each stage writes atomically (``taperfx.atomic``) and is skipped when its output
already exists, so an interrupted ``prepare`` picks up where it stopped. The
directory is locked while it is written (``taperfx.locks``); temporaries a killed
run left behind are removed. Every input is read once and checked (it exists, is
UTF-8, holds enough documents for both splits) before ``prepare.json`` or anything
else is written, so a refused command leaves no trace.

Inputs: TinyStories-style .txt (stories separated by ``<|endoftext|>`` lines),
one-document-per-line .txt, or .jsonl with a text field.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import re
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from taperfx.atomic import atomic_path, remove_stale, scratch_dir, write_text
from taperfx.errors import BadInput, DataError, InputNotFound, WouldOverwrite
from taperfx.jsonfile import read_json_object
from taperfx.locks import hold_directory
from taperfx.train.corpus import LABEL, synthetic_stories

__all__ = [
    "prepare_data",
    "read_documents",
    "count_documents",
    "held_out",
    "claim_data_directory",
    "DOC_SEPARATOR",
    "SPLITS",
    "DEFAULT_VOCAB_SIZE",
]

DOC_SEPARATOR = "<|endoftext|>"
SETTINGS_FILE = "prepare.json"
DEFAULT_VOCAB_SIZE = 4096
# How documents are held out: "interleaved" takes every k-th document (k = round(1 / val_fraction)),
# "tail" the last val_fraction of them (for corpora in an order worth keeping, such as novels).
SPLITS = ("interleaved", "tail")
_ENCODE_CHUNK = 2048
# What the stages write (prepare.json aside, written before them): each one is skipped when its file exists.
_STAGE_FILES = ("corpus.txt", "tokenizer.model", "tokenizer.vocab", "train.bin", "val.bin", "meta.json")
# Temporaries of taperfx versions before taperfx.atomic (removed under the lock).
_LEGACY_TEMPORARIES = (".train.bin.", ".val.bin.", ".meta.json.", ".prepare.json.", ".corpus.txt.", ".prepare.")


def _lines(path: Path) -> Iterator[str]:
    """The lines of a text file, decoded as UTF-8 one by one so that an error names its line."""
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                yield raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(
                    f"{path}:{lineno}: not UTF-8 text (byte {exc.start} of the line is {raw[exc.start]:#04x}); "
                    "convert the file to UTF-8",
                    code="not-utf8",
                ) from None


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
        raise InputNotFound(f"input file {path} does not exist")
    if path.suffix == ".jsonl":
        for lineno, line in enumerate(_lines(path), 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)[text_field]
                if not isinstance(text, str):
                    raise TypeError(f"{text_field!r} holds a {type(text).__name__}")
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise DataError(
                    f"{path}:{lineno}: expected a JSON object with a {text_field!r} string ({exc})", code="bad-jsonl"
                ) from exc
            if text.strip():
                yield text.strip()
        return
    with path.open("rb") as f:
        separated = DOC_SEPARATOR.encode() in f.read(1 << 20)
    lines = _lines(path)
    if separated:
        yield from _separated_documents(lines)
    else:
        yield from (line.strip() for line in lines if line.strip())


def _documents(sources: list[Path], text_field: str) -> Iterator[str]:
    for source in sources:
        yield from read_documents(source, text_field)


def count_documents(sources: list[Path], text_field: str) -> int:
    """Read every input once, checking it decodes, and count its documents."""
    for source in sources:
        if not source.is_file():
            raise InputNotFound(f"input file {source} does not exist")
    return sum(1 for _ in _documents(sources, text_field))


def held_out(n_documents: int, val_fraction: float, split: str) -> list[bool]:
    """For each document, whether it goes to ``val``; refuses a split that leaves either side empty."""
    if split == "interleaved":
        every = max(2, round(1 / val_fraction))
        flags = [i % every == 0 for i in range(n_documents)]
    else:
        n_val = max(1, math.ceil(n_documents * val_fraction))
        flags = [i >= n_documents - n_val for i in range(n_documents)]
    n_val = sum(flags)
    if n_documents == 0:
        raise DataError("no text found in the inputs: the corpus is empty", code="empty-corpus")
    if n_val == n_documents or n_val == 0:
        raise DataError(
            f"{n_documents} document(s) leave {n_documents - n_val} for training and {n_val} for validation; "
            "both splits need at least one (give more documents)",
            code="empty-split",
        )
    return flags


@contextlib.contextmanager
def claim_data_directory(out: Path, settings: dict) -> Iterator[Path]:
    """Lock ``out``, remove stale temporaries, and refuse it if it was prepared with other settings.

    The caller validates its inputs, then ``write_text(out / "prepare.json", ...)`` before
    writing anything else (``record_settings``).
    """
    with hold_directory(out, "data prepare") as directory:
        remove_stale(directory, _LEGACY_TEMPORARIES)
        recorded = directory / SETTINGS_FILE
        if recorded.is_file():
            old = read_json_object(recorded, "use a new directory")
            if old != settings:
                differ = sorted(k for k in {*old, *settings} if old.get(k) != settings.get(k))
                raise WouldOverwrite(
                    f"{out} was prepared with different settings ({recorded}: {differ} differ); use a new directory",
                    code="prepared-differently",
                )
        elif found := [name for name in _STAGE_FILES if (directory / name).exists()]:
            # A stage whose output exists is skipped: another program's tokenizer.model or corpus.txt (a
            # checkpoint directory, a user's own corpus) would be taken for this prepare's, whatever its settings.
            raise WouldOverwrite(
                f"{out} holds {', '.join(found)} but no {SETTINGS_FILE}: not prepared by this command, or with "
                "settings that are unknown; use a new directory",
                code="prepared-differently",
            )
        yield directory


def record_settings(out: Path, settings: dict) -> None:
    write_text(out / SETTINGS_FILE, json.dumps(settings, indent=2) + "\n")


def _vocab_error(exc: RuntimeError, vocab_size: int) -> BadInput | None:
    """SentencePiece's refusal of a vocabulary size, as a BadInput naming the limit (None for other errors)."""
    text = str(exc)
    if match := re.search(r"Vocabulary size (?:is )?too high \((\d+)\)\. Please set it to a value <= (\d+)", text):
        return BadInput(
            f"--vocab-size {vocab_size}: this corpus supports at most {match[2]} pieces; "
            "give a smaller size, more text, or leave --vocab-size out to take what it supports",
            code="vocab-too-large",
        )
    if match := re.search(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)", text):
        return BadInput(
            f"--vocab-size {vocab_size}: the corpus's characters (and byte fallback's 256 byte pieces) "
            f"need at least {int(match[2]) + 4} pieces; give a larger size or a lower --character-coverage",
            code="vocab-too-small",
        )
    return None


def _train_tokenizer(
    out: Path,
    docs: Iterator[str],
    *,
    vocab_size: int,
    exact: bool,
    byte_fallback: bool,
    character_coverage: float,
    sample_bytes: int,
) -> None:
    import sentencepiece as spm

    failures: list[BaseException] = []

    def sentences() -> Iterator[str]:
        # SentencePiece wraps an exception raised here into "INTERNAL: ..."; keep the original to re-raise.
        try:
            seen = 0
            for doc in docs:
                for line in doc.splitlines():
                    if line.strip():
                        seen += len(line)
                        yield line
                if seen >= sample_bytes:
                    return
        except BaseException as exc:
            failures.append(exc)
            raise

    with scratch_dir(out, "tokenizer") as tmp:
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=sentences(),
                model_prefix=str(tmp / "tokenizer"),
                vocab_size=vocab_size,
                model_type="bpe",
                hard_vocab_limit=exact,  # a default size adapts to what a small corpus supports
                byte_fallback=byte_fallback,
                character_coverage=character_coverage,
                num_threads=os.cpu_count() or 1,
                max_sentence_length=1 << 16,
                minloglevel=2,
            )
        except RuntimeError as exc:
            if failures:
                raise failures[0] from None
            raise _vocab_error(exc, vocab_size) or exc
        for ext in ("vocab", "model"):  # the .model last: its presence marks the stage done
            (tmp / f"tokenizer.{ext}").replace(out / f"tokenizer.{ext}")


def _tokenize(out: Path, docs: Iterator[str], flags: list[bool]) -> dict:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    dtype = np.uint16 if sp.get_piece_size() <= 1 << 16 else np.uint32
    eos = sp.eos_id()
    counts = {"train": 0, "val": 0}
    n_docs = {"train": 0, "val": 0}
    with atomic_path(out / "train.bin") as train_tmp, atomic_path(out / "val.bin") as val_tmp:
        with train_tmp.open("wb") as train_f, val_tmp.open("wb") as val_f:
            files = {"train": train_f, "val": val_f}
            index = 0
            while chunk := list(itertools.islice(docs, _ENCODE_CHUNK)):
                pieces: dict[str, list[int]] = {"train": [], "val": []}
                for ids in sp.encode(chunk, num_threads=os.cpu_count() or 1):
                    split = "val" if flags[index] else "train"
                    pieces[split] += [*ids, eos]
                    n_docs[split] += 1
                    index += 1
                for split, tokens in pieces.items():  # one write per chunk and split
                    np.asarray(tokens, dtype=dtype).tofile(files[split])
                    counts[split] += len(tokens)
    return {
        "dtype": np.dtype(dtype).name,
        "vocab_size": sp.get_piece_size(),
        "eos_id": eos,
        "tokens": counts,
        "documents": n_docs,
    }


def check_split_settings(val_fraction: float, split: str) -> None:
    if not 0.0 < val_fraction <= 0.5:
        raise BadInput(f"val_fraction must lie in (0, 0.5], got {val_fraction}", code="out-of-range")
    if split not in SPLITS:
        raise BadInput(f"split must be one of {SPLITS}, got {split!r}", code="bad-choice")


def prepare_data(
    out_dir: str | os.PathLike,
    inputs: Iterable[str | os.PathLike] = (),
    *,
    vocab_size: int | None = None,
    val_fraction: float = 0.05,
    split: str = "interleaved",
    text_field: str = "text",
    n_stories: int = 12000,
    seed: int = 0,
    byte_fallback: bool = True,
    character_coverage: float = 0.9995,
    tokenizer_sample_mb: float = 200.0,
) -> Path:
    """Prepare ``out_dir`` for training and return it; with no ``inputs``, the synthetic corpus.

    ``val_fraction`` of the documents is held out (``split``: every k-th one, or the
    last ones). The tokenizer is trained on at most ``tokenizer_sample_mb`` of text from
    the start of the inputs; with ``byte_fallback`` (the default) characters outside
    its ``character_coverage`` are spelled as UTF-8 bytes instead of ``<unk>``. An
    explicit ``vocab_size`` is exact (a corpus that cannot support it is refused);
    ``None`` asks for ``DEFAULT_VOCAB_SIZE`` and takes what the corpus supports.
    Re-running on a finished or interrupted directory resumes; different settings
    for an existing directory are refused rather than silently mixed.
    """
    if vocab_size is not None and vocab_size < 16:
        raise BadInput(f"vocab_size must be at least 16, got {vocab_size}", code="out-of-range")
    if not 0.0 < character_coverage <= 1.0:
        raise BadInput(f"character_coverage must lie in (0, 1], got {character_coverage}", code="out-of-range")
    if n_stories <= 0:
        raise BadInput(f"n_stories must be positive, got {n_stories}", code="out-of-range")
    check_split_settings(val_fraction, split)
    sources = [Path(p).resolve() for p in inputs]
    settings = {
        "tokenizer": "sentencepiece",
        "inputs": [str(s) for s in sources] or None,
        "corpus": LABEL if not sources else "user files",
        "vocab_size": vocab_size,
        "byte_fallback": byte_fallback,
        "character_coverage": character_coverage,
        "val_fraction": val_fraction,
        "split": split,
        "text_field": text_field,
        "n_stories": n_stories if not sources else None,
        "seed": seed,
        "tokenizer_sample_mb": tokenizer_sample_mb,
    }
    flags = held_out(count_documents(sources, text_field) if sources else n_stories, val_fraction, split)
    with claim_data_directory(Path(out_dir), settings) as out:
        record_settings(out, settings)
        if not sources:
            corpus = out / "corpus.txt"
            if not corpus.is_file():
                write_text(corpus, "".join(f"{s}\n" for s in synthetic_stories(n_stories, seed)))
            sources = [corpus]
        if not (out / "tokenizer.model").is_file():
            _train_tokenizer(
                out,
                _documents(sources, text_field),
                vocab_size=vocab_size or DEFAULT_VOCAB_SIZE,
                exact=vocab_size is not None,
                byte_fallback=byte_fallback,
                character_coverage=character_coverage,
                sample_bytes=int(tokenizer_sample_mb * 1e6),
            )
        if not all((out / f"{s}.bin").is_file() for s in ("train", "val")) or not (out / "meta.json").is_file():
            meta = _tokenize(out, _documents(sources, text_field), flags)
            meta["corpus"] = settings["corpus"]
            write_text(out / "meta.json", json.dumps(meta, indent=2) + "\n")
    return out
