"""Reading the JSON records taperfx writes (a checkpoint's ``config.json``, a data directory's ``meta.json``, a
run's ``run.json``) with one answer for every way such a file can be damaged.

Each of these files is a JSON object. A truncated, emptied or hand-edited one (not UTF-8, not JSON, or JSON but
not an object: ``[]``, ``5``, ``"text"``) is the user's data, not a bug: ``DataError`` with code ``bad-json``
naming the file, instead of a ``JSONDecodeError`` or a ``TypeError`` from the first lookup far from the read.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from taperfx.errors import DataError

__all__ = ["read_json_object"]


def read_json_object(path: str | os.PathLike, remedy: str = "the file is corrupt") -> dict:
    """The JSON object in ``path``; ``remedy`` (what the user can do about a damaged file) ends the error."""
    path = Path(path)
    try:
        record = json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path} is not valid JSON ({exc}); {remedy}", code="bad-json") from exc
    if not isinstance(record, dict):
        raise DataError(f"{path} holds a JSON {type(record).__name__}, not an object; {remedy}", code="bad-json")
    return record
