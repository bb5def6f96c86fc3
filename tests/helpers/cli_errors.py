"""What a command-line test reads off stderr: the code of the one-line error (and that it is one line)."""

from __future__ import annotations


def error_code(capsys) -> str:
    """The ``CODE`` of ``taperfx CMD: error[CODE]: ...``; fails on a traceback or any second line."""
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    return err.split("error[", 1)[1].split("]", 1)[0]
