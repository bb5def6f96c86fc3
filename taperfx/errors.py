"""The package's error base: every error taperfx raises on purpose carries a machine-readable ``code``."""

from __future__ import annotations

__all__ = ["TaperfxError"]


class TaperfxError(Exception):
    """Base of taperfx's own errors; ``code`` names the problem for programs (tests, the CLI's exit status)."""

    code: str = "taperfx_error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = str(code)
