"""Token streams of a prepared directory: random training windows, fixed evaluation windows.

A sample is a contiguous window of ``context + 1`` tokens taken anywhere in the
memory-mapped stream (documents run into each other across EOS, as in nanoGPT and
the TinyStories baselines); inputs are its first ``context`` tokens and targets the
same window shifted by one.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from taperfx.errors import BadInput, DataError, InputNotFound
from taperfx.jsonfile import read_json_object

__all__ = ["PreparedData", "TokenStream", "open_data", "tokenizer_fingerprint", "tokenizer_vocabulary"]

Batch = tuple[torch.Tensor, torch.Tensor]


class TokenStream:
    """One split's tokens, memory-mapped, cut into windows of ``context + 1``."""

    def __init__(self, path: Path, dtype: str, context: int) -> None:
        if context <= 0:
            raise BadInput(f"context must be positive, got {context}")
        size, itemsize = Path(path).stat().st_size, np.dtype(dtype).itemsize
        if size == 0 or size % itemsize:
            raise DataError(
                f"{path} holds {size} bytes, not a whole number (> 0) of {dtype} tokens: it is empty or truncated; "
                "prepare the data again",
                code="bad-token-file",
            )
        self.tokens = np.memmap(path, dtype=np.dtype(dtype), mode="r")
        if len(self.tokens) < context + 1:
            raise BadInput(
                f"{path} holds {len(self.tokens)} tokens, fewer than context + 1 = {context + 1}: "
                "use a shorter context or more data"
            )
        self.context = context

    @property
    def n_windows(self) -> int:
        """How many distinct windows the split holds (one per start offset)."""
        return len(self.tokens) - self.context

    def _windows(self, starts: list[int]) -> Batch:
        rows = np.stack([self.tokens[s : s + self.context + 1] for s in starts]).astype(np.int64)
        windows = torch.from_numpy(rows)
        return windows[:, :-1], windows[:, 1:]

    def sample(self, batch_size: int, generator: torch.Generator) -> Batch:
        """``batch_size`` windows at uniformly random offsets drawn from ``generator``."""
        starts = torch.randint(0, len(self.tokens) - self.context, (batch_size,), generator=generator)
        return self._windows(starts.tolist())

    def evaluation_batches(self, batch_size: int, n_batches: int) -> Iterator[Batch]:
        """The same ``n_batches`` evenly spaced batches on every call, covering the split."""
        n = batch_size * n_batches
        starts = np.linspace(0, len(self.tokens) - self.context - 1, n).astype(np.int64).tolist()
        for i in range(0, n, batch_size):
            yield self._windows(starts[i : i + batch_size])


@dataclass(frozen=True)
class PreparedData:
    """A directory written by ``prepare_data``: its metadata, tokenizer and splits."""

    root: Path
    meta: dict

    @property
    def tokenizer_path(self) -> Path:
        return self.root / self.meta.get("tokenizer", "tokenizer.model")  # HF-tokenized data: tokenizer.json

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    def stream(self, split: str, context: int) -> TokenStream:
        if split not in ("train", "val"):
            raise BadInput(f"split must be 'train' or 'val', got {split!r}")
        return TokenStream(self.root / f"{split}.bin", self.meta["dtype"], context)


def tokenizer_vocabulary(tokenizer: Path) -> tuple | bytes:
    """What makes two tokenizer files the same tokenizer: a SentencePiece model's pieces (its file also records
    where it was trained), any other file's bytes."""
    if tokenizer.suffix != ".model":
        return tokenizer.read_bytes()
    from google.protobuf.message import DecodeError
    from sentencepiece import sentencepiece_model_pb2

    model = sentencepiece_model_pb2.ModelProto()
    try:
        model.ParseFromString(tokenizer.read_bytes())
    except DecodeError as exc:
        raise DataError(f"{tokenizer} is not a SentencePiece model ({exc})", code="not-sentencepiece") from exc
    if not model.pieces:  # an emptied file parses as a model without pieces
        raise DataError(f"{tokenizer} is not a SentencePiece model (no pieces)", code="not-sentencepiece")
    return tuple((p.piece, p.type) for p in model.pieces)


def tokenizer_fingerprint(tokenizer: Path) -> str:
    """SHA-256 of the tokenizer's kind (its suffix) and ``tokenizer_vocabulary``: equal for the same tokenizer
    trained again elsewhere, and small enough to record where the file itself is not kept (a folded program)."""
    vocabulary = tokenizer_vocabulary(tokenizer)
    payload = vocabulary if isinstance(vocabulary, bytes) else json.dumps(vocabulary).encode()
    return hashlib.sha256(tokenizer.suffix.encode() + b"\0" + payload).hexdigest()


def open_data(data_dir: str | os.PathLike) -> PreparedData:
    """Open a prepared directory, with a clear error for each thing that is missing."""
    root = Path(data_dir)
    if not (root / "meta.json").is_file():
        raise InputNotFound(f"{root} is not a prepared data directory (no meta.json); run `taperfx data prepare` first")
    data = PreparedData(root, read_json_object(root / "meta.json", "prepare the data again"))
    if not data.tokenizer_path.is_file():
        raise InputNotFound(f"tokenizer {data.tokenizer_path} is missing; re-run `taperfx data prepare` on {root}")
    tokenizer_vocabulary(data.tokenizer_path)  # a damaged one is named now, not copied into every checkpoint
    for split in ("train", "val"):
        if not (root / f"{split}.bin").is_file():
            raise InputNotFound(f"{root / f'{split}.bin'} is missing; re-run `taperfx data prepare` on {root}")
    return data
