"""Typed field access for decoded JSON request bodies.

Every getter raises `BadRequest` naming the field and the JSON type it got, so a client
sees `"stream" must be a boolean, got string` rather than a traceback or an engine error.
A field that is absent or null reads as its default.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from routerd.errors import BadRequest


def json_type(value: object) -> str:
    """The JSON name of a decoded value's type, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (list, tuple)):
        return "array"
    if isinstance(value, Mapping):
        return "object"
    return type(value).__name__


def _wrong(name: str, expected: str, value: object) -> BadRequest:
    return BadRequest(f'"{name}" must be {expected}, got {json_type(value)}')


def require_object(body: object, name: str = "request body") -> dict[str, Any]:
    if not isinstance(body, dict):
        raise BadRequest(f"{name} must be a JSON object, got {json_type(body)}")
    return body


def get_str(body: Mapping[str, Any], key: str, default: str = "") -> str:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, str):
        raise _wrong(key, "a string", value)
    return value


def get_bool(body: Mapping[str, Any], key: str, default: bool) -> bool:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _wrong(key, "a boolean", value)
    return value


def get_list(body: Mapping[str, Any], key: str) -> list[Any]:
    value = body.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise _wrong(key, "an array", value)
    return value


def get_object(body: Mapping[str, Any], key: str) -> dict[str, Any] | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _wrong(key, "an object", value)
    return value


def str_list(value: object, name: str) -> list[str]:
    """A string or a list of strings, as a list."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    raise _wrong(name, "a string or an array of strings", value)
