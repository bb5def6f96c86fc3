"""Output paths checked before the work: a command that will write after minutes of export says so at once.

Each check raises ``OutputNotWritable`` (or ``WouldOverwrite``) naming the path and
what is wrong with it: a directory where a file goes (or the reverse), a path under
a file, or a place this process cannot create files in (probed by creating one, so
read-only mounts and permissions are both caught).
"""

from __future__ import annotations

import os
from pathlib import Path

from taperfx.errors import OutputNotWritable, WouldOverwrite

__all__ = ["check_output_file", "check_output_dir"]


def _existing_ancestor(path: Path) -> Path:
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    return parent


def _check_creatable(path: Path, flag: str) -> None:
    """``path`` can be created (with its missing parents) by this process."""
    where = _existing_ancestor(path)
    if not where.is_dir():
        raise OutputNotWritable(f"{flag} {path}: {where} is a file, not a directory", code="output-under-file")
    probe = where / f".taperfx-probe-{os.getpid()}"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError as exc:
        raise OutputNotWritable(
            f"{flag} {path}: cannot create files in {where} ({exc.strerror})", code="output-not-writable"
        ) from None
    probe.unlink()


def check_output_file(path: str | os.PathLike, flag: str = "-o") -> Path:
    """A file output: may replace a file, never a directory."""
    path = Path(path)
    if path.is_dir():
        raise OutputNotWritable(f"{flag} {path} is a directory; name the file to write", code="output-is-directory")
    _check_creatable(path, flag)
    return path


def check_output_dir(path: str | os.PathLike, flag: str = "-o", *, new: bool = False) -> Path:
    """A directory output: an existing directory is written into (``new``: it must be absent or empty)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputNotWritable(f"{flag} {path} is a file; name a directory", code="output-is-file")
    if new and path.is_dir() and any(path.iterdir()):
        raise WouldOverwrite(f"{flag} {path} exists and is not empty; choose a new directory", code="output-exists")
    _check_creatable(path / "x" if path.is_dir() else path, flag)
    return path
