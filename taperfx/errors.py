"""The failures a user can cause or fix, as one exception family with machine-readable codes.

Every expected failure (bad input, a damaged file, an output that cannot be written,
a directory held by another process) is a ``TaperfxError``: the command line prints
it as one line ``taperfx COMMAND: error[CODE]: MESSAGE`` and exits with the class's
``exit_code``; anything else is a bug and keeps its traceback. Each class also
derives from the builtin exception that Python code would expect for the same
failure (``ValueError``, ``FileNotFoundError``, ``OSError``), so library callers can
keep catching those.

Exit codes (documented in README.md):

====  =============================================================
0     success
1     internal error (a bug: the traceback is printed)
2     usage or bad input (arguments, config values, missing inputs)
3     data or I/O (a damaged file, an unwritable output, disk full)
4     locked (another process is writing the same directory)
5     training diverged (NaN/Inf; the last good checkpoint is kept)
130   interrupted (Ctrl-C; what was kept and how to resume is printed)
====  =============================================================
"""

from __future__ import annotations

__all__ = [
    "TaperfxError",
    "BadInput",
    "InputNotFound",
    "WouldOverwrite",
    "DataError",
    "OutputNotWritable",
    "WriteFailed",
    "Locked",
    "Diverged",
    "EXIT_INTERRUPTED",
]

EXIT_INTERRUPTED = 130


class TaperfxError(Exception):
    """An expected failure: ``code`` names it for machines, the message for people."""

    code = "error"
    exit_code = 1

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class BadInput(TaperfxError, ValueError):
    """An argument or config value that cannot be what the user meant (exit 2)."""

    code = "bad-input"
    exit_code = 2


class InputNotFound(TaperfxError, FileNotFoundError):
    """A named input (file, directory, checkpoint) does not exist (exit 2)."""

    code = "not-found"
    exit_code = 2

    def __init__(self, message: str, code: str | None = None) -> None:
        TaperfxError.__init__(self, message, code)


class WouldOverwrite(TaperfxError, ValueError):
    """Writing would destroy or mix with data that is already there (exit 2): choose another output."""

    code = "would-overwrite"
    exit_code = 2


class DataError(TaperfxError, ValueError):
    """An input file exists but its content is damaged or unusable (exit 3); the message names the file."""

    code = "bad-data"
    exit_code = 3


class OutputNotWritable(TaperfxError, OSError):
    """An output path cannot be written (read-only, under a file, of the wrong kind); found before the work (exit 3)."""

    code = "output-not-writable"
    exit_code = 3

    def __init__(self, message: str, code: str | None = None) -> None:
        TaperfxError.__init__(self, message, code)


class WriteFailed(TaperfxError, OSError):
    """Writing an output failed part-way (disk full, file-size limit); the previous output is intact (exit 3)."""

    code = "write-failed"
    exit_code = 3

    def __init__(self, message: str, code: str | None = None) -> None:
        TaperfxError.__init__(self, message, code)


class Locked(TaperfxError):
    """Another process holds the directory's lock (exit 4); the message names it (pid, host, start time)."""

    code = "locked"
    exit_code = 4


class Diverged(TaperfxError):
    """Training produced NaN/Inf (exit 5); the message names the step and the last good checkpoint."""

    code = "diverged"
    exit_code = 5
