"""Safetensors shards read and written one tensor (one block of rows) at a time.

The ``safetensors`` package reads a tensor whole and writes a file from tensors
held in memory, so a checkpoint larger than RAM cannot pass through it. The format
is simple enough to stream: an 8-byte little-endian header length, a JSON header
``{key: {"dtype", "shape", "data_offsets": [begin, end]}}`` (offsets relative to
the end of the header), then the raw row-major bytes. ``ShardReader`` maps a file
read-only (``mmap``: pages come from the page cache and are not counted as the
process's own memory) and hands out zero-copy views; ``ShardWriter`` writes the
header first, from the shapes alone, then each tensor's bytes in header order.

A checkpoint directory holds ``model.safetensors``, or shards listed by
``model.safetensors.index.json`` (``{"metadata": {...}, "weight_map": {key: file}}``,
the Hugging Face layout); ``checkpoint_files`` answers which file holds which key.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import warnings
from pathlib import Path

import torch

from taperfx.errors import DataError, InputNotFound

__all__ = [
    "SINGLE_FILE",
    "INDEX_FILE",
    "TensorInfo",
    "ShardReader",
    "ShardWriter",
    "checkpoint_files",
    "write_index",
]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_ALIGN = 8


class TensorInfo:
    """Where one tensor's bytes lie in its file, with its dtype and shape."""

    __slots__ = ("dtype", "shape", "begin", "end")

    def __init__(self, dtype: torch.dtype, shape: tuple[int, ...], begin: int, end: int) -> None:
        self.dtype, self.shape, self.begin, self.end = dtype, tuple(shape), begin, end

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


def read_header(path: Path) -> tuple[int, dict[str, TensorInfo], dict]:
    """``(offset of the data, {key: TensorInfo}, metadata)`` of a safetensors file, checked against its size.

    Anything that is not a well-formed header describing bytes inside the file is the file's damage
    (``DataError``, code ``bad-checkpoint``), never a Python error from the parsing."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise _damaged(path, "not a safetensors file (shorter than its 8-byte header length)")
        (length,) = struct.unpack("<Q", head)
        if length > size - 8:
            raise _damaged(path, f"header length {length} exceeds the file ({size} bytes); the file is truncated")
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise _damaged(path, f"the safetensors header is not valid JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise _damaged(path, "the safetensors header is not a table of tensors")
    data = 8 + length
    metadata = header.pop("__metadata__", None) or {}
    infos = {}
    for key, entry in header.items():
        info = _tensor_info(path, key, entry)
        if info.end < info.begin or data + info.end > size or info.nbytes != info.numel * info.dtype.itemsize:
            raise _damaged(path, f"tensor {key} lies outside the file or has the wrong size; the file is corrupt")
        infos[key] = info
    return data, infos, metadata


def _tensor_info(path: Path, key: str, entry) -> TensorInfo:
    """One header entry, ``{"dtype", "shape", "data_offsets": [begin, end]}``, read or refused as damage."""
    if isinstance(entry, dict) and "dtype" in entry and entry["dtype"] not in DTYPES:
        raise _damaged(path, f"tensor {key} has dtype {entry['dtype']!r}, which taperfx does not read")
    try:
        begin, end = (int(o) for o in entry["data_offsets"])
        return TensorInfo(DTYPES[entry["dtype"]], tuple(int(n) for n in entry["shape"]), begin, end)
    except (KeyError, TypeError, ValueError) as exc:
        raise _damaged(path, f"tensor {key} has a malformed entry: {entry!r}") from exc


def _damaged(path: Path, problem: str) -> DataError:
    return DataError(f"{path}: {problem}", code="bad-checkpoint")


class ShardReader:
    """One safetensors file, memory-mapped read-only (or read-write for an in-place fold)."""

    def __init__(self, path: str | os.PathLike, *, writable: bool = False) -> None:
        self.path = Path(path)
        self.data, self.tensors, self.metadata = read_header(self.path)
        self._file = open(self.path, "r+b" if writable else "rb")
        size = self.path.stat().st_size
        access = mmap.ACCESS_WRITE if writable else mmap.ACCESS_READ
        self._map = mmap.mmap(self._file.fileno(), size, access=access) if size else None

    def view(self, key: str) -> torch.Tensor:
        """The tensor ``key`` as a view of the mapped file: no bytes are read until used."""
        info = self.tensors[key]
        if info.numel == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        with warnings.catch_warnings():  # a read-only map is not writable; the views are only read
            warnings.simplefilter("ignore", UserWarning)
            flat = torch.frombuffer(self._map, dtype=info.dtype, count=info.numel, offset=self.data + info.begin)
        return flat.view(info.shape)

    def raw(self, key: str) -> memoryview:
        """The bytes of ``key`` in the map (zero-copy)."""
        info = self.tensors[key]
        return memoryview(self._map)[self.data + info.begin : self.data + info.end]

    def flush(self) -> None:
        """Write dirty pages of a writable map to the file and wait for the disk."""
        if self._map is not None:
            self._map.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        """Close the file; the map goes with the last view of it (views may outlive the reader)."""
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:
                pass  # a tensor still views the map: it is unmapped when that tensor is freed
            self._map = None
        self._file.close()

    def __enter__(self) -> "ShardReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ShardWriter:
    """Writes a safetensors file whose tensors are declared up front and then streamed in declared order."""

    def __init__(self, path: str | os.PathLike, layout: dict[str, tuple[torch.dtype, tuple[int, ...]]]) -> None:
        self.path = Path(path)
        header, offset = {}, 0
        self._order = []
        for key, (dtype, shape) in layout.items():
            nbytes = self.nbytes(dtype, shape)
            header[key] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self._order.append((key, nbytes))
            offset += nbytes
        header["__metadata__"] = {"format": "pt"}
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % _ALIGN)
        self._file = open(self.path, "wb")
        self._file.write(struct.pack("<Q", len(text)) + text)
        self._next = 0  # index into _order of the tensor being written
        self._left = self._order[0][1] if self._order else 0

    @staticmethod
    def nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
        """Bytes of a tensor of ``dtype`` and ``shape``."""
        n = dtype.itemsize
        for s in shape:
            n *= s
        return n

    def _advance(self, nbytes: int) -> None:
        while self._left == 0 and nbytes and self._next + 1 < len(self._order):
            self._next += 1
            self._left = self._order[self._next][1]
        if nbytes > self._left:
            raise ValueError(f"{self.path}: more bytes written than declared for the tensors in order")
        self._left -= nbytes

    def write(self, block: torch.Tensor) -> None:
        """Append a contiguous block of the current tensor (whole rows, in order)."""
        data = block.detach().contiguous().view(-1).view(torch.uint8).numpy()
        self._advance(data.nbytes)
        self._file.write(memoryview(data))

    def write_raw(self, data: memoryview) -> None:
        """Append raw bytes of the current tensor (a tensor copied unchanged)."""
        self._advance(len(data))
        self._file.write(data)

    def close(self) -> None:
        """Finish the file, checking that every declared byte was written, and sync it to disk."""
        missing = self._left + sum(n for _, n in self._order[self._next + 1 :])
        if missing:
            self._file.close()
            raise ValueError(f"{self.path}: {missing} declared bytes were never written")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()


def checkpoint_files(directory: str | os.PathLike) -> dict[str, str]:
    """``{key: file name}`` of a checkpoint directory: its index, or the one ``model.safetensors``."""
    directory = Path(directory)
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise _damaged(index, f"not a safetensors index (no weight_map): {exc}") from exc
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise _damaged(index, "its weight_map is not a table of tensor names to shard files")
        missing = sorted({f for f in weight_map.values() if not (directory / f).is_file()})
        if missing:
            raise _damaged(index, f"it names shards that are missing: {missing}")
        return dict(weight_map)
    single = directory / SINGLE_FILE
    if not single.is_file():
        raise InputNotFound(f"{directory} holds neither {INDEX_FILE} nor {SINGLE_FILE}", code="not-a-checkpoint")
    _, infos, _ = read_header(single)
    return dict.fromkeys(infos, SINGLE_FILE)


def write_index(directory: str | os.PathLike, weight_map: dict[str, str], total_size: int) -> None:
    """``model.safetensors.index.json`` as ``save_pretrained`` writes it (keys sorted)."""
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    path = Path(directory) / INDEX_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(index, indent=2) + "\n")
    os.replace(tmp, path)
