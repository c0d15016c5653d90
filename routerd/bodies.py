"""Request bodies: the one JSON reader every route uses (routerd's and its engine's), and the
small field parsers shared by the dialects.

Hostile JSON is a 400, decided here before anything reaches an engine: nesting deeper than
the decoder's recursion limit, `NaN`/`Infinity`, numbers too large for a double, integers
beyond 64 bits (engines answer 5xx to all of these), and lone UTF-16 surrogates (they cannot
be encoded to UTF-8).
"""

from __future__ import annotations

import json
import math
from typing import Any

from .errors import BadRequest

def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite(text: str) -> float:
    value = float(text)
    if math.isinf(value):  # 1e400: no engine holds it
        raise ValueError(f"number {text[:40]} is too large")
    return value


def _int64(text: str) -> int:
    value = int(text)
    if not -(1 << 63) <= value < 1 << 64:  # int64 and uint64 (seeds): what engines parse
        raise ValueError(f"integer {text[:40]}... does not fit in 64 bits")
    return value


_decode = json.JSONDecoder(parse_constant=_no_constants, parse_float=_finite,
                           parse_int=_int64).decode


def parse_object(raw: bytes, *, required: bool = True) -> dict[str, Any]:
    """The request body as a JSON object, or BadRequest saying what is wrong with it."""
    if not raw:
        if required:
            raise BadRequest("missing request body")
        return {}
    try:
        body = _decode(raw.decode("utf-8"))
    except RecursionError:
        raise BadRequest("invalid JSON in request body: nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(f"invalid JSON in request body: {e}") from None
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    if b"\\u" in raw and b"\\ud" in raw.lower() and _has_lone_surrogate(body):
        raise BadRequest("invalid JSON in request body: a string holds a lone UTF-16 "
                         "surrogate (not encodable as UTF-8)")
    return body


def _has_lone_surrogate(value: Any) -> bool:
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    return False


def stream_flag(body: dict[str, Any], *, default: bool) -> bool:
    """The `stream` field: a boolean, absent or null meaning `default`."""
    value = body.get("stream")
    if value is None:
        return default
    if not isinstance(value, bool):
        raise BadRequest("stream must be a boolean")
    return value
