"""Atomic file writes: build under a temporary name in the same directory, then rename.

A crash (or a full disk) then leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["temporary_path", "write_text_atomic"]


def temporary_path(final: Path) -> Path:
    """A fresh empty file beside ``final`` (same filesystem, so ``replace`` is atomic)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=final.suffix, dir=final.parent)
    os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp's private 0600 is not what a shared output should end up with
    return Path(tmp)


def write_text_atomic(final: str | os.PathLike, text: str) -> None:
    final = Path(final)
    tmp = temporary_path(final)
    try:
        tmp.write_text(text)
        tmp.replace(final)
    finally:
        tmp.unlink(missing_ok=True)
