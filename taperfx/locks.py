"""An exclusive lock on an output directory, so two writers never interleave in it.

``taperfx train`` holds its run directory and ``taperfx data prepare`` its data
directory for as long as they write. The lock is ``fcntl.flock`` on
``DIR/.taperfx.lock``: the kernel drops it when the holder exits, however it exits,
so a killed process never leaves the directory locked. The file records who holds
it (pid, host, start time, command), and a second writer's error names them.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Iterator

from taperfx.errors import Locked

__all__ = ["LOCK_FILE", "hold_directory"]

LOCK_FILE = ".taperfx.lock"


def _holder(lock: Path) -> str:
    try:
        info = json.loads(lock.read_text())
        return f"pid {info['pid']} on {info['host']} since {info['since']} ({info['command']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (its details are not readable)"


def _acquire(lock: Path) -> int:
    """An open descriptor of ``lock`` holding its flock; the file is the one at the path (not one just unlinked)."""
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise Locked(
                f"{lock.parent} is being written by {_holder(lock)}; wait for it or choose another directory"
            ) from None
        try:
            if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # the holder we waited for removed the file as it released it: lock the new one


@contextlib.contextmanager
def hold_directory(directory: str | os.PathLike, purpose: str) -> Iterator[Path]:
    """Create ``directory`` if needed and hold its lock for the ``with`` block.

    Raises ``Locked`` naming the holder when another process has it. The lock file is
    removed on release; a directory this call created is removed too if the block left
    nothing in it (a run refused for bad input leaves no trace).
    """
    directory = Path(directory)
    created = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    lock = directory / LOCK_FILE
    fd = _acquire(lock)
    try:
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        os.pwrite(fd, json.dumps({**info, "command": purpose}).encode(), 0)
        yield directory
    finally:
        lock.unlink(missing_ok=True)  # before the unlock: a waiter that opened this file sees it gone and retries
        os.close(fd)
        if created and not any(directory.iterdir()):
            directory.rmdir()
