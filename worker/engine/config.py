"""Typed dataclass configs parsed from untrusted JSON dicts.

Every spec section the engine reads (architecture configs, method parameters,
hyperparameters) is a dataclass; this module turns a JSON object into one,
rejecting unknown keys and wrong types with an ``EngineError`` whose ``param``
is the dotted location of the offending key, so the API can point at it.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, TypeVar

from .errors import EngineError

C = TypeVar("C")


def parse_config(cls: type[C], data: Any, *, code: str, prefix: str) -> C:
    """Build dataclass ``cls`` from ``data`` (a dict, or None for all defaults)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise EngineError(code, f"{prefix} must be an object, got {type(data).__name__}", param=prefix)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in data.items():
        if key not in fields:
            valid = ", ".join(fields) or "(none)"
            raise EngineError(
                code, f"unknown key {key!r} in {prefix}; valid keys: {valid}", param=f"{prefix}.{key}"
            )
        values[key] = _coerce(value, hints[key], code=code, param=f"{prefix}.{key}")
    try:
        return cls(**values)
    except EngineError as err:
        # __post_init__ validators raise with a bare field name; qualify it here.
        if err.param and not err.param.startswith(prefix):
            err.param = f"{prefix}.{err.param}"
        raise


def _coerce(value: Any, hint: Any, *, code: str, param: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, code=code, param=param)
            except EngineError as err:
                errors.append(err)
        raise errors[0]
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            raise EngineError(code, f"{param} must be a list, got {_json_type(value)}", param=param)
        return [_coerce(v, item, code=code, param=f"{param}[{i}]") for i, v in enumerate(value)]
    if hint is bool:
        if not isinstance(value, bool):
            raise EngineError(code, f"{param} must be true or false, got {_json_type(value)}", param=param)
        return value
    if hint is int:
        # JSON has one number type, so 3.0 is accepted as 3; bools are not numbers here.
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise EngineError(code, f"{param} must be an integer, got {_json_type(value)}", param=param)
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise EngineError(code, f"{param} must be a number, got {_json_type(value)}", param=param)
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise EngineError(code, f"{param} must be a string, got {_json_type(value)}", param=param)
        return value
    if hint is dict or origin is dict:
        if not isinstance(value, dict):
            raise EngineError(code, f"{param} must be an object, got {_json_type(value)}", param=param)
        return value
    raise TypeError(f"unsupported config field type {hint!r} for {param}")


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return f"number {value!r}"
    if isinstance(value, str):
        return f"string {value!r}"
    if isinstance(value, (list, tuple)):
        return "list"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def require(condition: bool, code: str, message: str, param: str) -> None:
    """Raise ``EngineError(code, message, param)`` unless ``condition`` holds."""
    if not condition:
        raise EngineError(code, message, param=param)
