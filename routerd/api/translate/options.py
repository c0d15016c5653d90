"""Ollama `options` -> the engine's per-request fields; load-time options kept apart.

llama-server (and routerd's own worker) accept llama.cpp's sampler names as extra fields in
their OpenAI endpoints, so `top_k`, `min_p`, `typical_p`, `repeat_penalty`, `repeat_last_n`,
`mirostat*` and `tfs_z` travel under those names. `num_predict` becomes `max_tokens`
(llama-server aliases it to `n_predict`, so the same body also suits its native `/infill`).
Options that only mean something when a model is loaded (`num_ctx`, `num_gpu`, ...) are never
sent per request; `load_options` returns them for the scheduler. Unknown keys are ignored,
as Ollama does.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from routerd.api.translate.fields import get_object, json_type, str_list
from routerd.errors import BadRequest

_INT = "an integer"
_NUM = "a number"
_BOOL = "a boolean"

# Ollama option -> (engine field, expected kind).
SAMPLING: dict[str, tuple[str, str]] = {
    "temperature": ("temperature", _NUM),
    "top_k": ("top_k", _INT),
    "top_p": ("top_p", _NUM),
    "min_p": ("min_p", _NUM),
    "typical_p": ("typical_p", _NUM),
    "seed": ("seed", _INT),
    "repeat_penalty": ("repeat_penalty", _NUM),
    "repeat_last_n": ("repeat_last_n", _INT),
    "presence_penalty": ("presence_penalty", _NUM),
    "frequency_penalty": ("frequency_penalty", _NUM),
    "mirostat": ("mirostat", _INT),
    "mirostat_tau": ("mirostat_tau", _NUM),
    "mirostat_eta": ("mirostat_eta", _NUM),
    "tfs_z": ("tfs_z", _NUM),
    "num_keep": ("n_keep", _INT),
}

# Options fixed when the model is loaded; the scheduler, not the request, applies them.
LOAD: dict[str, str] = {
    "num_ctx": _INT,
    "num_batch": _INT,
    "num_gpu": _INT,
    "main_gpu": _INT,
    "num_thread": _INT,
    "num_gqa": _INT,
    "low_vram": _BOOL,
    "f16_kv": _BOOL,
    "logits_all": _BOOL,
    "vocab_only": _BOOL,
    "use_mmap": _BOOL,
    "use_mlock": _BOOL,
    "numa": _BOOL,
    "embedding_only": _BOOL,
    "rope_frequency_base": _NUM,
    "rope_frequency_scale": _NUM,
}


# Load options an engine is started with: bounded, so one request cannot ask for a context
# no machine has (num_ctx 10**400 overflowed the memory estimate) or layers no model has.
LOAD_RANGES: dict[str, tuple[int, int]] = {
    "num_ctx": (1, 1 << 24),
    "num_batch": (1, 1 << 20),
    "num_gpu": (-1, 1 << 16),
    "main_gpu": (0, 255),
    "num_thread": (0, 4096),
    "num_gqa": (0, 1 << 16),
}
_INT_MAX = (1 << 63) - 1  # what every engine's JSON parser holds


def coerce(key: str, value: Any, kind: str) -> Any:
    """Check one option's type and range; integral floats are accepted where an integer is
    due. Non-finite numbers and integers beyond 64 bits are refused (engines answer 5xx)."""
    t = type(value)
    if kind is _NUM:
        if t is int and -_INT_MAX <= value <= _INT_MAX or t is float and math.isfinite(value):
            return value
    elif kind is _INT:
        if t is float and value.is_integer():
            value, t = int(value), int
        if t is int:
            low, high = LOAD_RANGES.get(key, (-_INT_MAX, _INT_MAX))
            if not low <= value <= high:
                raise BadRequest(f'option "{key}" must be from {low} to {high}, got {value}')
            return value
    elif t is bool:
        return value
    raise BadRequest(f'option "{key}" must be {kind}, got {json_type(value)}')


def merged_options(body: Mapping[str, Any], defaults: Mapping[str, Any]) -> Mapping[str, Any]:
    """The model's default options overlaid by the request's (request wins)."""
    options = get_object(body, "options")
    base: Mapping[str, Any] | None = defaults.get("options")
    if not base:
        return options or {}
    if not options:
        return base
    merged = dict(base)
    merged.update(options)
    return merged


def sampling_fields(options: Mapping[str, Any]) -> dict[str, Any]:
    """Per-request engine fields for the given (merged) Ollama options."""
    out: dict[str, Any] = {}
    for key, value in options.items():
        if value is None:
            continue
        spec = SAMPLING.get(key)
        if spec is not None:
            out[spec[0]] = coerce(key, value, spec[1])
        elif key == "num_predict":
            n = coerce(key, value, _INT)
            if n > 0:  # -1 = no limit, -2 = fill the context; Ollama treats 0 as no limit
                out["max_tokens"] = n
        elif key == "stop":
            stop = str_list(value, "options.stop")
            if stop:
                out["stop"] = stop
    return out


def load_options(
    body: Mapping[str, Any], defaults: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The load-time options (num_ctx, num_gpu, use_mmap, ...) of a request, type-checked.

    `defaults` is the same mapping `chat_request` takes; the request's values win.
    """
    options = merged_options(body, defaults or {})
    return {
        key: coerce(key, value, LOAD[key])
        for key, value in options.items()
        if key in LOAD and value is not None
    }


def response_format(fmt: Any) -> dict[str, Any] | None:
    """Ollama `format` ("json" or a JSON schema object) -> OpenAI `response_format`."""
    if fmt is None or fmt == "":
        return None
    if fmt == "json":
        return {"type": "json_object"}
    if isinstance(fmt, dict):  # the handler bounds its free strings (schema.bound_body)
        return {"type": "json_schema", "json_schema": {"name": "schema", "schema": fmt}}
    raise BadRequest(f'"format" must be "json" or a JSON schema object, got {json_type(fmt)}')


def native_schema(fmt: dict[str, Any]) -> dict[str, Any]:
    """The llama.cpp `json_schema` field for an OpenAI `response_format` (completions, infill)."""
    if fmt["type"] == "json_schema":
        schema: dict[str, Any] = fmt["json_schema"]["schema"]
        return schema
    return {"type": "object"}
