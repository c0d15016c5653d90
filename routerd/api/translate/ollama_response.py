"""Engine replies (OpenAI dialect, or llama.cpp native for `/infill`) -> Ollama replies.

Durations are nanoseconds. Counts come from `usage`; prompt and eval durations from
llama-server's `timings` (`prompt_ms`, `predicted_ms`) when present. Without timings (an
engine that sends none), the compute time `total_ns - load_ns` is split between prompt and
eval in proportion to their token counts, so clients that divide by a duration never divide
by zero.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from typing import Any

from routerd.errors import UpstreamError

__all__ = [
    "chat_response",
    "embed_response",
    "embeddings_response",
    "error_chunk_ollama",
    "generate_response",
    "load_response",
    "logprobs",
    "metrics",
    "now_rfc3339",
    "ollama_tool_call",
]

_stamp_cache: tuple[int, str] = (-1, "")


def now_rfc3339(ns: int | None = None) -> str:
    """UTC time as Go's RFC3339Nano, like Ollama: `2024-06-01T12:00:00.123456789Z`.

    Trailing zeros of the fraction are dropped, as Go does. The per-second prefix is cached,
    since every streamed chunk carries a timestamp."""
    global _stamp_cache
    if ns is None:
        ns = time.time_ns()
    sec, frac = divmod(ns, 1_000_000_000)
    cached_sec, prefix = _stamp_cache
    if sec != cached_sec:
        prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
        _stamp_cache = (sec, prefix)
    if not frac:
        return prefix + "Z"
    return f"{prefix}.{frac:09d}".rstrip("0") + "Z"


def done_reason(finish_reason: Any) -> str:
    """OpenAI finish_reason -> Ollama done_reason (Ollama reports tool calls as "stop")."""
    if not finish_reason or finish_reason == "tool_calls":
        return "stop"
    return str(finish_reason)


def native_done_reason(stop_type: Any) -> str:
    """llama.cpp native `stop_type` (eos | word | limit | none) -> Ollama done_reason."""
    return "length" if stop_type == "limit" else "stop"


def native_usage(resp: Mapping[str, Any]) -> dict[str, Any] | None:
    """`usage` for a llama.cpp native final object (tokens_evaluated / tokens_predicted)."""
    if "tokens_predicted" not in resp and "tokens_evaluated" not in resp:
        return None
    return {
        "prompt_tokens": resp.get("tokens_evaluated") or 0,
        "completion_tokens": resp.get("tokens_predicted") or 0,
    }


def metrics(
    usage: Mapping[str, Any] | None,
    timings: Mapping[str, Any] | None,
    *,
    load_ns: int,
    total_ns: int,
    eval_fallback: int = 0,
) -> dict[str, int]:
    """Ollama's duration and count fields. `eval_fallback`: eval count when nothing says."""
    p = e = None
    p_ns = e_ns = 0
    if usage:
        p, e = usage.get("prompt_tokens"), usage.get("completion_tokens")
    if timings:
        if p is None:
            p = (timings.get("prompt_n") or 0) + (timings.get("cache_n") or 0)
        if e is None:
            e = timings.get("predicted_n")
        p_ns = int((timings.get("prompt_ms") or 0) * 1e6)
        e_ns = int((timings.get("predicted_ms") or 0) * 1e6)
    p = int(p or 0)
    e = int(e if e is not None else eval_fallback)
    if not timings:
        compute = max(int(total_ns) - int(load_ns), 0)
        tokens = p + e
        p_ns = compute * p // tokens if tokens else 0
        e_ns = compute - p_ns
        if p and not p_ns:
            p_ns = 1
        if e and not e_ns:
            e_ns = 1
    return {
        "total_duration": int(total_ns),
        "load_duration": int(load_ns),
        "prompt_eval_count": p,
        "prompt_eval_duration": p_ns,
        "eval_count": e,
        "eval_duration": e_ns,
    }


def check_error(resp: Mapping[str, Any]) -> None:
    """Raise `UpstreamError` for an engine error object (`{"error": ...}`)."""
    err = resp.get("error")
    if err is None:
        return
    if isinstance(err, Mapping):
        err = err.get("message") or json.dumps(err)
    raise UpstreamError(f"engine error: {err}")


def _first_choice(resp: Mapping[str, Any]) -> Mapping[str, Any]:
    check_error(resp)
    choices = resp.get("choices")
    if not choices or not isinstance(choices[0], Mapping):
        raise UpstreamError("engine reply has no choices")
    choice: Mapping[str, Any] = choices[0]
    return choice


def parse_arguments(text: Any) -> Any:
    """Tool-call arguments as JSON text -> an object, as Ollama clients expect.

    Empty text is `{}`; text that is not a JSON object is kept as the string, not lost."""
    if not isinstance(text, str):
        return text if text is not None else {}
    if not text.strip():
        return {}
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if isinstance(value, dict) else text


def ollama_tool_call(call_id: Any, name: Any, arguments: Any, index: int) -> dict[str, Any]:
    out: dict[str, Any] = {
        "function": {"index": index, "name": name or "", "arguments": parse_arguments(arguments)}
    }
    if call_id:
        out["id"] = call_id
    return out


def _token(t: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"token": t.get("token", ""), "logprob": t.get("logprob", 0.0)}
    if t.get("bytes") is not None:
        out["bytes"] = t["bytes"]
    return out


def logprobs(choice: Mapping[str, Any]) -> list[dict[str, Any]] | None:
    """An OpenAI choice's `logprobs.content` -> Ollama's `logprobs` (token, logprob, bytes,
    top_logprobs); None when the engine sent none."""
    lp = choice.get("logprobs")
    content = lp.get("content") if isinstance(lp, Mapping) else None
    if not content:
        return None
    out = []
    for t in content:
        item = _token(t)
        top = t.get("top_logprobs")
        if top:
            item["top_logprobs"] = [_token(x) for x in top]
        out.append(item)
    return out


def chat_response(
    resp: Mapping[str, Any], model: str, *, load_ns: int, total_ns: int
) -> dict[str, Any]:
    """A non-streamed `/v1/chat/completions` reply -> an `/api/chat` reply."""
    choice = _first_choice(resp)
    src = choice.get("message") or {}
    msg: dict[str, Any] = {"role": "assistant", "content": src.get("content") or ""}
    thinking = src.get("reasoning_content")
    if thinking:
        msg["thinking"] = thinking
    calls = src.get("tool_calls")
    if calls:
        msg["tool_calls"] = [
            ollama_tool_call(c.get("id"), (c.get("function") or {}).get("name"),
                             (c.get("function") or {}).get("arguments"), i)
            for i, c in enumerate(calls)
        ]
    out = {
        "model": model,
        "created_at": now_rfc3339(),
        "message": msg,
        "done": True,
        "done_reason": done_reason(choice.get("finish_reason")),
        **metrics(resp.get("usage"), resp.get("timings"), load_ns=load_ns, total_ns=total_ns),
    }
    lp = logprobs(choice)
    if lp:
        out["logprobs"] = lp
    return out


def generate_response(
    resp: Mapping[str, Any], model: str, *, load_ns: int, total_ns: int
) -> dict[str, Any]:
    """A non-streamed chat, text-completion or native `/infill` reply -> `/api/generate`."""
    thinking = None
    lp = None
    if "choices" not in resp and "content" in resp:  # llama.cpp native (/infill)
        check_error(resp)
        text = resp.get("content") or ""
        reason = native_done_reason(resp.get("stop_type"))
        usage = resp.get("usage") or native_usage(resp)
    else:
        choice = _first_choice(resp)
        text = choice.get("text")
        if text is None:
            src = choice.get("message") or {}
            text = src.get("content")
            thinking = src.get("reasoning_content")
        reason = done_reason(choice.get("finish_reason"))
        usage = resp.get("usage")
        lp = logprobs(choice)
    out: dict[str, Any] = {
        "model": model,
        "created_at": now_rfc3339(),
        "response": text or "",
    }
    if thinking:
        out["thinking"] = thinking
    out["done"] = True
    out["done_reason"] = reason
    out.update(metrics(usage, resp.get("timings"), load_ns=load_ns, total_ns=total_ns))
    if lp:
        out["logprobs"] = lp
    return out


def load_response(model: str, *, chat: bool, done_reason: str = "load") -> dict[str, Any]:
    """Ollama's answer to a request with nothing to generate (empty prompt / messages):
    it only loads (`done_reason: "load"`) or, with `keep_alive: 0`, unloads ("unload")."""
    out: dict[str, Any] = {"model": model, "created_at": now_rfc3339()}
    if chat:
        out["message"] = {"role": "assistant", "content": ""}
    else:
        out["response"] = ""
    out["done"] = True
    out["done_reason"] = done_reason
    return out


def _vectors(resp: Mapping[str, Any]) -> list[list[float]]:
    check_error(resp)
    data = resp.get("data")
    if not isinstance(data, list):
        raise UpstreamError("engine embeddings reply has no data")
    if any(d.get("index", i) != i for i, d in enumerate(data)):
        data = sorted(data, key=lambda d: d.get("index", 0))
    return [d.get("embedding") or [] for d in data]


def _cut(vec: list[float], dims: int) -> list[float]:
    """The first `dims` components, L2-normalised again (Ollama's `dimensions`)."""
    vec = vec[:dims]
    norm = math.sqrt(math.fsum(x * x for x in vec))
    return [x / norm for x in vec] if norm else vec


def embed_response(
    resp: Mapping[str, Any],
    model: str,
    *,
    load_ns: int,
    total_ns: int,
    dimensions: int | None = None,
) -> dict[str, Any]:
    """A `/v1/embeddings` reply -> an `/api/embed` reply (vectors in input order)."""
    vectors = _vectors(resp)
    if dimensions:
        vectors = [_cut(v, dimensions) if len(v) > dimensions else v for v in vectors]
    usage = resp.get("usage") or {}
    return {
        "model": model,
        "embeddings": vectors,
        "total_duration": int(total_ns),
        "load_duration": int(load_ns),
        "prompt_eval_count": int(usage.get("prompt_tokens") or 0),
    }


def embeddings_response(resp: Mapping[str, Any]) -> dict[str, Any]:
    """A `/v1/embeddings` reply -> a legacy `/api/embeddings` reply (one vector)."""
    vectors = _vectors(resp)
    return {"embedding": vectors[0] if vectors else []}


def error_chunk_ollama(msg: str) -> dict[str, Any]:
    """An Ollama error object; also the in-band error line of a started NDJSON stream."""
    return {"error": msg}
