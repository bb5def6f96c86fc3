"""Atomic writes of files and directories: build under a temporary name beside the target, then rename.

A crash, a kill or a full disk leaves either the old output or the new one, never
half of one, and never a mix. Every writer in taperfx goes through this module.

- Temporary names are ``.NAME.partial-PID-RANDOM`` plus the target's suffix, in the
  target's directory (same filesystem, so ``os.replace`` is atomic; the suffix keeps
  readers such as ``torch.export.save``, which expects ``.pt2``, content).
- Files are created with mode 0666 and directories 0777, both masked by the
  user's umask, as a plain ``open`` / ``mkdir`` would (``mkstemp``'s 0600 is not);
  files that a library wrote privately into a directory output get the same.
- Contents are fsynced before the rename and the directory after it.
- ``remove_stale`` deletes the temporaries a killed process left behind; it is
  called by the commands that hold the directory's lock (``taperfx.locks``).
"""

from __future__ import annotations

import contextlib
import io
import os
import secrets
import shutil
from pathlib import Path
from typing import Iterator

from taperfx.errors import WriteFailed

__all__ = [
    "fsync",
    "atomic_path",
    "atomic_dir",
    "scratch_dir",
    "write_text",
    "write_bytes",
    "remove_stale",
    "is_partial",
    "torch_save",
]

_MARK = ".partial-"


def _temporary_name(final: Path) -> Path:
    return final.with_name(f".{final.name}{_MARK}{os.getpid()}-{secrets.token_hex(4)}{final.suffix}")


def is_partial(path: Path) -> bool:
    """Whether ``path`` is a temporary of this module (finished outputs never are)."""
    return path.name.startswith(".") and _MARK in path.name


def fsync(path: str | os.PathLike) -> None:
    """Flush ``path`` (a file or a directory: a rename is durable once its directory is) to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration):
        mask = os.umask(0)  # no /proc: read it by setting it (briefly process-wide)
        os.umask(mask)
        return mask


def _share_as_umask_says(path: Path) -> None:
    """Give a file, or the files in a directory, that a library wrote the mode a plain ``open`` would
    (safetensors, for one, writes 0600)."""
    mode = 0o666 & ~_umask()
    for entry in [path] if path.is_file() else path.rglob("*"):
        if entry.is_file() and not entry.is_symlink():
            os.chmod(entry, mode)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def _committing(final: Path, tmp: Path, what: str) -> Iterator[Path]:
    try:
        yield tmp
        _share_as_umask_says(tmp)
        if tmp.is_dir():
            for entry in tmp.rglob("*"):
                if entry.is_file():
                    fsync(entry)
        fsync(tmp)
        if final.is_dir() and not final.is_symlink():
            # Replacing a directory: swap the old one aside, then drop it (rename cannot replace a non-empty dir).
            old = _temporary_name(final)
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        fsync(final.parent)
    except OSError as exc:
        _remove(tmp)
        if exc.errno is None:
            raise
        previous = "the previous version is intact" if final.exists() else "nothing was written"
        raise WriteFailed(f"cannot write {what} {final}: {exc.strerror} ({previous})", code="write-failed") from exc
    except BaseException:
        _remove(tmp)
        raise


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file path beside ``final``; on success it replaces ``final``, on failure it is removed.

    The file exists (empty, umask-respecting mode) when yielded; the caller may also
    replace it (``torch.export.save(program, tmp)``). An ``OSError`` while writing
    becomes ``WriteFailed`` naming ``final`` and saying whether the old file survives.
    """
    final = Path(final)
    tmp = _temporary_name(final)
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    with _committing(final, tmp, "file") as path:
        yield path


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``final``; on success it replaces ``final`` as a whole."""
    final = Path(final)
    tmp = _temporary_name(final)
    os.mkdir(tmp, 0o777)
    with _committing(final, tmp, "directory") as path:
        yield path


@contextlib.contextmanager
def scratch_dir(parent: str | os.PathLike, name: str) -> Iterator[Path]:
    """A working directory in ``parent``, always removed (named like the temporaries, so ``remove_stale`` finds it)."""
    tmp = _temporary_name(Path(parent) / name)
    os.mkdir(tmp, 0o777)
    try:
        yield tmp
    finally:
        _remove(tmp)


class _RecordingWriter(io.RawIOBase):
    """A file for ``torch.save`` that remembers the OSError of a failed write (torch reports only its own)."""

    def __init__(self, f) -> None:
        self.f, self.error = f, None

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as exc:
            self.error = exc
            raise


def torch_save(obj, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)``, raising the OSError (disk full, file-size limit) behind a failed write.

    torch turns a failed write into a ``RuntimeError`` about stream positions; this
    makes it the ``OSError`` that ``atomic_path`` / ``atomic_dir`` report as ``WriteFailed``.
    """
    import torch

    with open(path, "wb") as f:
        writer = _RecordingWriter(f)
        try:
            torch.save(obj, writer)
        except RuntimeError:
            if writer.error is not None:
                raise writer.error from None
            raise


def write_bytes(final: str | os.PathLike, data: bytes) -> None:
    with atomic_path(final) as tmp:
        tmp.write_bytes(data)


def write_text(final: str | os.PathLike, text: str) -> None:
    write_bytes(final, text.encode("utf-8"))


def remove_stale(directory: str | os.PathLike, legacy_prefixes: tuple[str, ...] = ()) -> list[Path]:
    """Delete the temporaries in ``directory`` whose writer is gone; return what was removed.

    A temporary is stale when the process named in it no longer runs on this host;
    ``legacy_prefixes`` (such as ``.step-``) name temporaries of older taperfx
    versions, removed unconditionally: call this only while holding the directory's lock.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for entry in directory.iterdir():
        if is_partial(entry):
            pid = entry.name.split(_MARK, 1)[1].split("-", 1)[0]
            if pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid)):
                continue
        elif not any(entry.name.startswith(p) for p in legacy_prefixes):
            continue
        _remove(entry)
        removed.append(entry)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
