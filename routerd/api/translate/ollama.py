"""Ollama request bodies -> OpenAI-dialect bodies for the engine (pure, no I/O).

`defaults` is the model's configuration as a mapping:
  {"options": {...Ollama options...}, "system": "default system prompt"}
(from the config entry or a pulled model's params/system layers; both keys optional).
Request options override default options; the default system prompt is used only when the
conversation has no system message (chat) or the request has no `system` (generate).

Not translated: `keep_alive` (the caller's), `template` (the engine applies the model's own
chat template), `context` (deprecated in Ollama), `truncate` on embed (the handler
applies it: `embed_token_limit`); `logprobs` on raw and suffix
generation (only the chat path carries them).
The responses and streams live in `ollama_response.py` and `ollama_stream.py`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from routerd.api.translate.fields import (
    get_bool,
    get_list,
    get_str,
    json_type,
    require_object,
    str_list,
)
from routerd.api.translate.options import (
    load_options,
    merged_options,
    native_schema,
    response_format,
    sampling_fields,
)
from routerd.errors import BadRequest

__all__ = [
    "CHAT_PATH",
    "COMPLETIONS_PATH",
    "EMBEDDINGS_PATH",
    "INFILL_PATH",
    "chat_request",
    "embed_request",
    "embeddings_request",
    "generate_request",
    "load_options",
]

CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"
EMBEDDINGS_PATH = "/v1/embeddings"
# llama-server's fill-in-the-middle endpoint (native dialect: input_prefix/input_suffix).
# Its `/v1/completions` rejects `suffix` ("Unsupported param: suffix").
INFILL_PATH = "/infill"

_EMPTY: Mapping[str, Any] = {}
_COMPACT = (",", ":")

# Base64 openings of common image formats -> MIME type for the data URI.
_IMAGE_MAGIC = (
    ("iVBORw0KGgo", "image/png"),
    ("/9j/", "image/jpeg"),
    ("R0lGOD", "image/gif"),
    ("UklGR", "image/webp"),
    ("Qk", "image/bmp"),
)


def chat_request(body: Mapping[str, Any], defaults: Mapping[str, Any] = _EMPTY) -> dict[str, Any]:
    """`/api/chat` body -> `/v1/chat/completions` body."""
    body = require_object(body)
    messages = [_message(m, i) for i, m in enumerate(get_list(body, "messages"))]
    system = defaults.get("system")
    if system and not any(m["role"] == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": system})
    out: dict[str, Any] = {"messages": messages}
    tools = get_list(body, "tools")
    if tools:
        out["tools"] = tools
    _think(body, out)
    _common(body, merged_options(body, defaults), out, chat=True)
    return out


def generate_request(
    body: Mapping[str, Any], defaults: Mapping[str, Any] = _EMPTY
) -> tuple[str, dict[str, Any]]:
    """`/api/generate` body -> (engine path, body).

    Templated (the default) -> chat completions with [system, user prompt (+ images)];
    `raw: true` -> `/v1/completions` with the prompt verbatim; `suffix` -> llama-server's
    native `/infill` (fill-in-the-middle; needs a model with FIM tokens), whose replies
    `generate_response` and `GenerateStream` also read.
    """
    body = require_object(body)
    prompt = get_str(body, "prompt")
    suffix = get_str(body, "suffix")
    raw = get_bool(body, "raw", False)
    images = get_list(body, "images")
    options = merged_options(body, defaults)
    if suffix or raw:
        if images:
            raise BadRequest('"images" cannot be used with "raw" or "suffix"')
        if suffix:
            out: dict[str, Any] = {"input_prefix": prompt, "input_suffix": suffix, "prompt": ""}
        else:
            out = {"prompt": prompt}
        _common(body, options, out, chat=False)
        return (INFILL_PATH if suffix else COMPLETIONS_PATH), out
    system = get_str(body, "system") or defaults.get("system")
    messages: list[dict[str, Any]] = []
    if system:
        messages.append({"role": "system", "content": system})
    user: dict[str, Any] = {"role": "user", "content": prompt}
    if images:
        user["content"] = _content_parts(prompt, images, "images")
    messages.append(user)
    out = {"messages": messages}
    _think(body, out)
    _common(body, options, out, chat=True)
    return CHAT_PATH, out


def embed_request(body: Mapping[str, Any]) -> dict[str, Any]:
    """`/api/embed` body (`input`: str | [str], `truncate`, `dimensions`) -> `/v1/embeddings`.

    An empty `input` gives `"input": []`: Ollama treats that as "just load the model", which
    the caller answers without asking the engine. `dimensions` is passed on; pass it to
    `embed_response` too, which cuts and renormalises where the engine did not.
    """
    body = require_object(body)
    raw_input = body.get("input")
    inputs = [] if raw_input is None else str_list(raw_input, "input")
    get_bool(body, "truncate", True)  # validated; see the module docstring
    out: dict[str, Any] = {"input": inputs, "encoding_format": "float"}
    dims = body.get("dimensions")
    if dims is not None:
        if type(dims) is not int or dims <= 0:
            raise BadRequest(f'"dimensions" must be a positive integer, got {json_type(dims)}')
        out["dimensions"] = dims
    _model(body, out)
    return out


EMBED_UBATCH = 512  # llama-server's default physical batch: one embedding input must fit it


def embed_token_limit(launch: Any) -> int | None:
    """The tokens one embedding input may have on this engine: its slot's context and its
    physical batch (`-ub`/`--ubatch-size` in the model's args, else llama-server's 512).
    None where routerd does not start llama-server (its own engine, a command, a peer)."""
    if launch.backend not in ("llama-server", "llamafile"):
        return None
    ubatch, args = EMBED_UBATCH, list(launch.args)
    for i, a in enumerate(args):
        value = args[i + 1] if a in ("-ub", "--ubatch-size") and i + 1 < len(args) else (
            a.split("=", 1)[1] if a.startswith("--ubatch-size=") else None)
        if value is not None and value.isdigit():
            ubatch = int(value)
    return min(ubatch, max(launch.ctx_size // max(launch.parallel, 1), 1))


def embeddings_request(body: Mapping[str, Any]) -> dict[str, Any]:
    """Legacy `/api/embeddings` body (`prompt`) -> `/v1/embeddings` body.

    An empty prompt gives `"input": []` (Ollama: load only, answer `{"embedding": []}`).
    """
    body = require_object(body)
    prompt = get_str(body, "prompt")
    out: dict[str, Any] = {"input": [prompt] if prompt else [], "encoding_format": "float"}
    _model(body, out)
    return out


# --- helpers -------------------------------------------------------------------------------


def _model(body: Mapping[str, Any], out: dict[str, Any]) -> None:
    model = body.get("model")
    if isinstance(model, str):
        out["model"] = model


def _common(
    body: Mapping[str, Any], options: Mapping[str, Any], out: dict[str, Any], *, chat: bool
) -> None:
    """Fields every generating request shares: model, stream, sampling, format."""
    _model(body, out)
    stream = get_bool(body, "stream", True)  # Ollama streams unless told otherwise
    out["stream"] = stream
    if stream:
        out["stream_options"] = {"include_usage": True}
    if options:
        out.update(sampling_fields(options))
    if chat:
        _logprobs(body, out)
    fmt = response_format(body.get("format"))
    if fmt is not None:
        out["response_format"] = fmt
        if not chat:  # llama-server reads `response_format` only on chat; `json_schema` elsewhere
            out["json_schema"] = native_schema(fmt)


def _logprobs(body: Mapping[str, Any], out: dict[str, Any]) -> None:
    """Ollama `logprobs` / `top_logprobs` -> the engine's OpenAI fields (chat only)."""
    if get_bool(body, "logprobs", False):
        out["logprobs"] = True
        top = body.get("top_logprobs")
        if top is not None:
            if type(top) is not int or not 0 <= top <= 20:
                raise BadRequest('"top_logprobs" must be an integer from 0 to 20')
            if top:
                out["top_logprobs"] = top


def _think(body: Mapping[str, Any], out: dict[str, Any]) -> None:
    """Ollama `think` (bool, or "low"/"medium"/"high") -> llama-server's reasoning switches."""
    think = body.get("think")
    if think is None:
        return
    if isinstance(think, bool):
        out["chat_template_kwargs"] = {"enable_thinking": think}
    elif isinstance(think, str) and think in ("low", "medium", "high"):
        out["reasoning_effort"] = think
    else:
        raise BadRequest(
            f'"think" must be a boolean or one of "low", "medium", "high", got {json_type(think)}'
        )


def _message(m: Any, i: int) -> dict[str, Any]:
    where = f"messages[{i}]"
    if not isinstance(m, dict):
        raise BadRequest(f"{where} must be an object, got {json_type(m)}")
    role = m.get("role")
    if not isinstance(role, str) or not role:
        raise BadRequest(f"{where}.role must be a non-empty string, got {json_type(role)}")
    content = get_str(m, "content") if "content" in m else ""
    out: dict[str, Any] = {"role": role, "content": content}
    images = m.get("images")
    if images:
        out["content"] = _content_parts(content, images, f"{where}.images")
    tool_calls = m.get("tool_calls")
    if tool_calls:
        if not isinstance(tool_calls, list):
            raise BadRequest(f"{where}.tool_calls must be an array, got {json_type(tool_calls)}")
        out["tool_calls"] = [_tool_call(tc, f"{where}.tool_calls[{j}]", i, j)
                             for j, tc in enumerate(tool_calls)]
    thinking = m.get("thinking")
    if thinking:
        out["reasoning_content"] = get_str(m, "thinking")
    tool_name = m.get("tool_name")
    if tool_name:
        out["name"] = get_str(m, "tool_name")
    tool_call_id = m.get("tool_call_id")
    if tool_call_id:
        out["tool_call_id"] = get_str(m, "tool_call_id")
    return out


def _tool_call(tc: Any, where: str, i: int, j: int) -> dict[str, Any]:
    """Ollama tool call (arguments as an object) -> OpenAI (arguments as JSON text)."""
    fn = tc.get("function") if isinstance(tc, dict) else None
    if not isinstance(fn, dict):
        raise BadRequest(f"{where}.function must be an object")
    name = fn.get("name")
    if not isinstance(name, str) or not name:
        raise BadRequest(f"{where}.function.name must be a non-empty string")
    args = fn.get("arguments")
    if args is None:
        text = "{}"
    elif isinstance(args, str):
        text = args
    elif isinstance(args, dict):
        text = json.dumps(args, ensure_ascii=False, separators=_COMPACT)
    else:
        raise BadRequest(f"{where}.function.arguments must be an object, got {json_type(args)}")
    call_id = tc.get("id")
    return {
        "id": call_id if isinstance(call_id, str) and call_id else f"call_{i}_{j}",
        "type": "function",
        "function": {"name": name, "arguments": text},
    }


def _content_parts(text: str, images: Any, where: str) -> list[dict[str, Any]]:
    """Text plus base64 images -> OpenAI content parts (images first, as Ollama renders them)."""
    if not isinstance(images, list):
        raise BadRequest(f"{where} must be an array of base64 strings, got {json_type(images)}")
    parts: list[dict[str, Any]] = []
    for k, img in enumerate(images):
        if not isinstance(img, str) or not img:
            raise BadRequest(f"{where}[{k}] must be a base64 string, got {json_type(img)}")
        parts.append({"type": "image_url", "image_url": {"url": image_data_uri(img)}})
    if text:
        parts.append({"type": "text", "text": text})
    return parts


def image_data_uri(b64: str) -> str:
    """A data URI for a base64 image, its MIME type sniffed from the first bytes."""
    if b64.startswith("data:"):
        return b64
    for magic, mime in _IMAGE_MAGIC:
        if b64.startswith(magic):
            return f"data:{mime};base64,{b64}"
    # llama-server accepts only data:image/...; it sniffs the real format from the bytes.
    return f"data:image/jpeg;base64,{b64}"
