"""A text corpus tokenized with a Hugging Face checkpoint's own tokenizer, as a prepared data directory.

Fine-tuning a pretrained model needs its tokenizer, not a freshly trained
SentencePiece one. ``prepare_text`` writes the same layout as ``taperfx data
prepare`` (``train.bin``, ``val.bin``, ``meta.json``; every k-th document held
out, each document followed by EOS) so the trainer and ``taperfx eval`` read it
unchanged; ``meta.json`` names the tokenizer file (``tokenizer.json``) instead of
``tokenizer.model``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from taperfx.atomic import atomic_path, write_text
from taperfx.errors import BadInput
from taperfx.models.hf_extra import transformers
from taperfx.train.prepare import (
    check_split_settings,
    claim_data_directory,
    count_documents,
    held_out,
    read_documents,
    record_settings,
)

__all__ = ["prepare_text"]

TOKENIZER_FILE = "tokenizer.json"


def prepare_text(
    model_dir: str | os.PathLike,
    inputs: Iterable[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    val_fraction: float = 0.05,
    split: str = "interleaved",
    text_field: str = "text",
) -> Path:
    """Tokenize ``inputs`` with ``model_dir``'s tokenizer into ``out_dir`` and return it.

    Locked, validated and recorded in ``prepare.json`` as ``taperfx.train.prepare_data``
    does, so re-preparing a directory with another tokenizer (in either direction) is refused.
    """
    check_split_settings(val_fraction, split)
    sources = [Path(p).resolve() for p in inputs]
    if not sources:
        raise BadInput("preparing with a Hugging Face tokenizer needs at least one input file", code="no-inputs")
    settings = {
        "tokenizer": "hf",
        "hf_tokenizer": str(Path(model_dir).resolve()),
        "inputs": [str(s) for s in sources],
        "val_fraction": val_fraction,
        "split": split,
        "text_field": text_field,
    }
    flags = held_out(count_documents(sources, text_field), val_fraction, split)
    tokenizer = transformers().AutoTokenizer.from_pretrained(model_dir)
    if not tokenizer.is_fast:
        raise BadInput(
            f"{model_dir}: a fast (tokenizers) tokenizer is needed, so that it saves as one {TOKENIZER_FILE}",
            code="slow-tokenizer",
        )
    if tokenizer.eos_token_id is None:
        raise BadInput(f"{model_dir}: the tokenizer has no EOS token, so documents cannot be separated", code="no-eos")
    dtype = np.uint16 if len(tokenizer) <= 1 << 16 else np.uint32
    with claim_data_directory(Path(out_dir), settings) as out:
        record_settings(out, settings)
        if (out / "meta.json").is_file():
            return out
        counts, documents = {"train": 0, "val": 0}, {"train": 0, "val": 0}
        with atomic_path(out / "train.bin") as train_tmp, atomic_path(out / "val.bin") as val_tmp:
            with train_tmp.open("wb") as train_f, val_tmp.open("wb") as val_f:
                files = {"train": train_f, "val": val_f}
                for index, text in enumerate(_all_documents(sources, text_field)):
                    split_name = "val" if flags[index] else "train"
                    ids = np.asarray([*tokenizer(text)["input_ids"], tokenizer.eos_token_id], dtype=dtype)
                    ids.tofile(files[split_name])
                    counts[split_name] += ids.size
                    documents[split_name] += 1
        with atomic_path(out / TOKENIZER_FILE) as tmp:
            tokenizer.backend_tokenizer.save(str(tmp))
        meta = {
            "dtype": np.dtype(dtype).name,
            "vocab_size": len(tokenizer),
            "eos_id": tokenizer.eos_token_id,
            "tokens": counts,
            "documents": documents,
            "corpus": "user files",
            "tokenizer": TOKENIZER_FILE,
            "hf_tokenizer_from": str(model_dir),
        }
        write_text(out / "meta.json", json.dumps(meta, indent=2) + "\n")  # last: marks a finished directory
    return out


def _all_documents(sources: list[Path], text_field: str) -> Iterator[str]:
    for source in sources:
        yield from read_documents(source, text_field)
