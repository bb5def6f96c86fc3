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
import tempfile
from pathlib import Path
from typing import Iterable

import numpy as np

from taperfx.models.hf_extra import transformers
from taperfx.train.prepare import read_documents

__all__ = ["prepare_text"]

TOKENIZER_FILE = "tokenizer.json"


def prepare_text(
    model_dir: str | os.PathLike,
    inputs: Iterable[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    val_fraction: float = 0.05,
    text_field: str = "text",
) -> Path:
    """Tokenize ``inputs`` with ``model_dir``'s tokenizer into ``out_dir`` and return it."""
    if not 0.0 < val_fraction <= 0.5:
        raise ValueError(f"val_fraction must lie in (0, 0.5], got {val_fraction}")
    sources = [Path(p) for p in inputs]
    if not sources:
        raise ValueError("prepare_text needs at least one input file")
    tokenizer = transformers().AutoTokenizer.from_pretrained(model_dir)
    if not tokenizer.is_fast:
        raise ValueError(
            f"{model_dir}: a fast (tokenizers) tokenizer is needed, so that it saves as one {TOKENIZER_FILE}"
        )
    if tokenizer.eos_token_id is None:
        raise ValueError(f"{model_dir}: the tokenizer has no EOS token, so documents cannot be separated")
    dtype = np.uint16 if len(tokenizer) <= 1 << 16 else np.uint32
    val_every = max(2, round(1 / val_fraction))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".prepare.", dir=out))
    try:
        counts, documents = {"train": 0, "val": 0}, {"train": 0, "val": 0}
        with (tmp / "train.bin").open("wb") as train_f, (tmp / "val.bin").open("wb") as val_f:
            files = {"train": train_f, "val": val_f}
            index = 0
            for source in sources:
                for text in read_documents(source, text_field):
                    split = "val" if index % val_every == 0 else "train"
                    ids = np.asarray([*tokenizer(text)["input_ids"], tokenizer.eos_token_id], dtype=dtype)
                    ids.tofile(files[split])
                    counts[split] += ids.size
                    documents[split] += 1
                    index += 1
        if not documents["train"]:
            raise ValueError(f"{[str(s) for s in sources]} hold too few documents to leave any for training")
        tokenizer.backend_tokenizer.save(str(tmp / TOKENIZER_FILE))
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
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        # meta.json is moved last: its presence marks a finished directory.
        for name in ("train.bin", "val.bin", TOKENIZER_FILE, "meta.json"):
            (tmp / name).replace(out / name)
    finally:
        for leftover in tmp.iterdir():
            leftover.unlink()
        tmp.rmdir()
    return out
