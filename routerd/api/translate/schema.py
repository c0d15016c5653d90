"""Bounded structured output: every JSON schema routerd sends to an engine closes (pure).

Constrained decoding makes an answer follow a schema token by token, but a free string has no
end: a small model that starts repeating inside one (SmolLM2-135M does, in about 1 call in 5
at Ollama's default sampling) writes until the length limit and the JSON never closes. So
routerd bounds every free string it hands to an engine's grammar, where the schema sets no
bound of its own, at a quarter of the slot's context in characters (`string_bound`: a token is
at least one character, so two looping fields still close inside the slot); the grammar then
forces the closing quote and the object still parses. A schema's own `maxLength` (or `enum`, `const`, `pattern`, `format`)
always wins: set `maxLength` to lift the bound.

    bounded(schema, n)                 # a copy; the caller's schema is never changed
    bounded_format(response_format, n) # an OpenAI `response_format`, bounded where it has one
    bound_body(engine_body, n)         # both fields an engine reads, in place
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["MAX_STRING", "bound_body", "bounded", "bounded_format", "string_bound"]

MAX_STRING = 1000  # characters, where no slot size is known
MIN_STRING = 64


def string_bound(ctx_size: int, parallel: int) -> int:
    """The bound for free strings on an engine whose slots hold ctx_size / parallel tokens."""
    return max(MIN_STRING, ctx_size // max(parallel, 1) // 4)


def bound_body(body: dict[str, Any], max_string: int) -> dict[str, Any]:
    """An engine body's `response_format` (chat) and `json_schema` (llama.cpp native) bounded."""
    if "response_format" in body:
        body["response_format"] = bounded_format(body["response_format"], max_string)
    if isinstance(body.get("json_schema"), Mapping):
        body["json_schema"] = bounded(body["json_schema"], max_string)
    return body

# Keywords whose values are one subschema, a list of them, or a name -> subschema map.
_ONE = ("items", "additionalProperties", "not", "contains", "if", "then", "else",
        "unevaluatedProperties", "unevaluatedItems", "propertyNames")
_MANY = ("anyOf", "oneOf", "allOf", "prefixItems")
_MAP = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
# A string constrained by one of these is bounded already (or shaped by the grammar's own rule).
_SHAPED = ("maxLength", "enum", "const", "pattern", "format")


def _is_string(schema: Mapping[str, Any]) -> bool:
    kind = schema.get("type")
    return kind == "string" or (isinstance(kind, list) and "string" in kind)


def bounded(schema: Any, max_string: int = MAX_STRING) -> Any:
    """`schema` with `maxLength: max_string` on each free string, at any depth."""
    if isinstance(schema, list):
        return [bounded(s, max_string) for s in schema]
    if not isinstance(schema, Mapping):
        return schema  # `true`/`false` schemas and odd values pass as they are
    out: dict[str, Any] = dict(schema)
    for key in _ONE:
        if isinstance(out.get(key), (Mapping, list)):
            out[key] = bounded(out[key], max_string)
    for key in _MANY:
        if isinstance(out.get(key), list):
            out[key] = [bounded(s, max_string) for s in out[key]]
    for key in _MAP:
        if isinstance(out.get(key), Mapping):
            out[key] = {name: bounded(s, max_string) for name, s in out[key].items()}
    if _is_string(out) and not any(k in out for k in _SHAPED):
        out["maxLength"] = max_string
    return out


def bounded_format(fmt: Any, max_string: int = MAX_STRING) -> Any:
    """An OpenAI `response_format` with its JSON schema bounded (anything else as it is)."""
    if not isinstance(fmt, Mapping) or fmt.get("type") != "json_schema":
        return fmt
    spec = fmt.get("json_schema")
    if not isinstance(spec, Mapping) or not isinstance(spec.get("schema"), Mapping):
        return fmt
    return {**fmt, "json_schema": {**spec, "schema": bounded(spec["schema"], max_string)}}
