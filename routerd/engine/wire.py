"""Pure request parsing and response shaping in llama-server's dialect (no I/O, no model).

Request bodies become keyword arguments for `llama_cpp.Llama.create_*`; library results
become the objects llama-server answers with (OpenAI objects plus `timings`, and the
native `/completion` objects).
"""

from __future__ import annotations

import json
from typing import Any, Mapping

from routerd.engine.runner import RunnerClosed
from routerd.engine.stats import TokenStats
from routerd.errors import BadRequest, RouterdError

DONE = b"data: [DONE]\n\n"

# llama-server's defaults, so both engines sample alike when a field is absent.
SAMPLING_DEFAULTS: dict[str, Any] = {
    "temperature": 0.8, "top_p": 0.95, "top_k": 40, "min_p": 0.05, "typical_p": 1.0,
    "repeat_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0,
}
_FLOATS = ("temperature", "top_p", "min_p", "typical_p", "repeat_penalty",
           "presence_penalty", "frequency_penalty")
_LIMIT_FIELDS = ("max_tokens", "max_completion_tokens", "n_predict")


class NotSupported(RouterdError):
    status = 501
    code = "not_supported"
    type = "not_supported_error"


class Unavailable(RouterdError):
    status = 503
    code = "unavailable"
    type = "unavailable_error"


def as_routerd_error(exc: Exception) -> RouterdError:
    """Map what a handler or the library raised to an error with a status."""
    if isinstance(exc, RouterdError):
        return exc
    if isinstance(exc, RunnerClosed):
        return Unavailable(str(exc))
    if isinstance(exc, ValueError):  # llama_cpp's way to reject a request (context size...)
        return BadRequest(str(exc))
    return RouterdError(f"{type(exc).__name__}: {exc}")


def error_body(exc: RouterdError) -> dict[str, Any]:
    """llama-server's error object."""
    return {"error": {"code": exc.status, "message": exc.message, "type": exc.type}}


def sse(obj: Mapping[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


def _number(body: Mapping[str, Any], key: str, kind: type) -> Any:
    value = body[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadRequest(f"'{key}' must be a number")
    if kind is int and value != int(value):
        raise BadRequest(f"'{key}' must be an integer")
    return kind(value)


def _stop(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return list(value)
    raise BadRequest("'stop' must be a string or a list of strings")


def _logit_bias(value: Any) -> dict[int, float] | None:
    """OpenAI's {"token_id": bias} or llama-server's [[id, bias | false], ...]."""
    if value is None:
        return None
    if isinstance(value, dict):
        pairs: list[Any] = list(value.items())
    elif isinstance(value, list):
        pairs = value
    else:
        raise BadRequest("'logit_bias' must be an object or a list of [token, bias]")
    out: dict[int, float] = {}
    try:
        for token, bias in pairs:
            out[int(token)] = -1e30 if bias is False else float(bias)
    except (TypeError, ValueError):
        raise BadRequest("'logit_bias' entries must be [token id, number | false]") from None
    return out or None


def max_tokens(body: Mapping[str, Any]) -> int | None:
    """max_tokens / max_completion_tokens / n_predict; None or <= 0 means until the end."""
    for key in _LIMIT_FIELDS:
        if body.get(key) is not None:
            n = _number(body, key, int)
            return n if n > 0 else None
    return None


def sampling_kwargs(body: Mapping[str, Any]) -> dict[str, Any]:
    """The sampling fields every generation route accepts; unknown fields are ignored."""
    out = dict(SAMPLING_DEFAULTS)
    for key in _FLOATS:
        if body.get(key) is not None:
            out[key] = _number(body, key, float)
    if body.get("top_k") is not None:
        out["top_k"] = _number(body, "top_k", int)
    if body.get("seed") is not None:
        seed = _number(body, "seed", int)
        out["seed"] = seed if seed >= 0 else None  # llama-server: -1 = random
    out["stop"] = _stop(body.get("stop"))
    bias = _logit_bias(body.get("logit_bias"))
    if bias:
        out["logit_bias"] = bias
    out["max_tokens"] = max_tokens(body)
    return out


def _message(msg: Any) -> dict[str, Any]:
    if not isinstance(msg, dict) or not isinstance(msg.get("role"), str):
        raise BadRequest("each message must be an object with a 'role'")
    content = msg.get("content")
    if isinstance(content, list):  # OpenAI content parts: text only
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                raise NotSupported("only text content parts are supported")
            texts.append(str(part.get("text", "")))
        msg = {**msg, "content": "".join(texts)}
    elif content is not None and not isinstance(content, str):
        raise BadRequest("message 'content' must be a string or a list of parts")
    return msg


def _response_format(value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise BadRequest("'response_format' must be an object")
    kind = value.get("type")
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        out: dict[str, Any] = {"type": "json_object"}
        if isinstance(value.get("schema"), dict):
            out["schema"] = value["schema"]
        return out
    if kind == "json_schema":
        schema = (value.get("json_schema") or {}).get("schema")
        return {"type": "json_object", **({"schema": schema} if isinstance(schema, dict) else {})}
    raise BadRequest(f"unsupported response_format type {kind!r}")


def chat_kwargs(body: Mapping[str, Any], model: str) -> dict[str, Any]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list")
    out = sampling_kwargs(body)
    out.update(messages=[_message(m) for m in messages], model=model,
               response_format=_response_format(body.get("response_format")))
    if isinstance(body.get("tools"), list) and body["tools"]:
        out["tools"] = body["tools"]
        if body.get("tool_choice") is not None:
            out["tool_choice"] = body["tool_choice"]
    return out


def prompt_of(body: Mapping[str, Any]) -> str | list[int]:
    """A string, a token list, or a one-element list of either."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool)
                                        for t in prompt):
        return list(prompt)
    raise BadRequest("'prompt' must be a string or a list of token ids (one prompt)")


def completion_kwargs(body: Mapping[str, Any], model: str) -> dict[str, Any]:
    out = sampling_kwargs(body)
    out.update(prompt=prompt_of(body), model=model)
    return out


def embedding_inputs(body: Mapping[str, Any]) -> list[str | list[int]]:
    value = body.get("input", body.get("content"))
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        if all(isinstance(t, int) and not isinstance(t, bool) for t in value):
            return [list(value)]
        if all(isinstance(v, str) or (isinstance(v, list) and
                                      all(isinstance(t, int) for t in v)) for v in value):
            return list(value)
    raise BadRequest("'input' must be a string, a list of strings or token lists")


def with_stats(obj: dict[str, Any], stats: TokenStats) -> dict[str, Any]:
    """An OpenAI response (or final chunk) with llama-server's `usage` and `timings`."""
    return {**obj, "usage": stats.usage(), "timings": stats.timings()}


def usage_chunk(last: Mapping[str, Any], stats: TokenStats) -> dict[str, Any]:
    """The extra chunk `stream_options.include_usage` asks for: no choices, just usage."""
    return {"id": last.get("id"), "object": last.get("object"), "created": last.get("created"),
            "model": last.get("model"), "choices": [], "usage": stats.usage(),
            "timings": stats.timings()}


def include_usage(body: Mapping[str, Any]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and bool(options.get("include_usage"))


def native_chunk(text: str) -> dict[str, Any]:
    return {"content": text, "stop": False, "id_slot": 0, "index": 0}


def native_final(content: str, finish_reason: str | None, stats: TokenStats,
                 model: str, stop_words: list[str]) -> dict[str, Any]:
    """llama-server's last /completion object (`content` is "" when streaming)."""
    stopped_limit = finish_reason == "length"
    stopped_eos = not stopped_limit and stats.stopped_eos
    stopped_word = not stopped_limit and not stopped_eos and bool(stop_words)
    return {
        "content": content, "stop": True, "id_slot": 0, "index": 0, "model": model,
        "tokens_predicted": stats.predicted, "tokens_evaluated": stats.prompt_tokens,
        "tokens_cached": stats.cached_tokens, "truncated": False,
        "stopped_eos": stopped_eos, "stopped_word": stopped_word,
        "stopped_limit": stopped_limit, "stopping_word": "",
        "stop_type": "limit" if stopped_limit else "eos" if stopped_eos
        else "word" if stopped_word else "none",
        "timings": stats.timings(),
    }
