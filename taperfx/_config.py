"""JSON round-trip and field checks shared by the dataclass configs (model, training) stored in checkpoints."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import ClassVar

from taperfx.errors import BadInput

__all__ = ["DictConfig", "check_fields"]


def _expectation(hint) -> str:
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_expectation(a) for a in args)
    if typing.get_origin(hint) is tuple:
        return f"a list of {len(args)} numbers"
    return {
        int: "an integer",
        float: "a number",
        bool: "true or false",
        str: "a string",
        dict: "a table",
        type(None): "none (leave it out)",
    }[hint]


def _coerce(hint, value):
    """``value`` as a field of type ``hint`` wants it, or raise TypeError."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        for option in args:
            try:
                return _coerce(option, value)
            except TypeError:
                pass
        raise TypeError
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise TypeError
        return tuple(_coerce(a, v) for a, v in zip(args, value))
    if hint is type(None):
        if value is not None:
            raise TypeError
        return None
    if isinstance(value, bool) and hint is not bool:
        raise TypeError  # true is not 1
    if hint is int:
        if isinstance(value, float) and value.is_integer():
            return int(value)  # 2e3 steps is 2000 steps; 20.5 steps is refused
        if not isinstance(value, int):
            raise TypeError
        return value
    if hint is float:
        if not isinstance(value, (int, float)):
            raise TypeError
        return float(value)
    if not isinstance(value, hint):
        raise TypeError
    return value


def _hint_for_string(value) -> str:
    if isinstance(value, str):
        try:
            float(value)
        except ValueError:
            return ""
        return f" (as TOML a number needs a digit before the point: {float(value)!r})"
    return ""


def check_fields(cls, values: dict, prefix: str = "") -> dict:
    """``values`` checked against the dataclass ``cls``'s field types: unknown keys and wrong types are refused
    naming key, value and expectation; integral floats become ints. Returns the coerced values."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise BadInput(
            f"unknown {cls.config_kind} key(s) {[prefix + k for k in unknown]}; known: {sorted(known)}",
            code="config-unknown-key",
        )
    out = {}
    for key, value in values.items():
        try:
            out[key] = _coerce(hints[key], value)
        except TypeError:
            raise BadInput(
                f"{prefix}{key}={value!r}: expected {_expectation(hints[key])}{_hint_for_string(value)}",
                code="config-type",
            ) from None
        if isinstance(out[key], float) and not math.isfinite(out[key]):
            raise BadInput(f"{prefix}{key}={value!r}: expected a finite number", code="config-range")
    return out


class DictConfig:
    """``to_dict`` / ``from_dict`` for a dataclass; unknown keys are refused by name, not ignored."""

    config_kind: ClassVar[str] = "config"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise BadInput(
                f"unknown {cls.config_kind} keys: {sorted(unknown)}; known: {sorted(known)}",
                code="config-unknown-key",
            )
        return cls(**d)
