"""Anthropic Messages <-> the engines' OpenAI chat completions (pure, no I/O).

    body = messages_request(anthropic_body)          # -> /v1/chat/completions body
    message = message_response(chat_reply, model)    # <- a non-streamed reply
    stream = MessageStream(model)                    # <- streamed chunks, as Anthropic events
    events = stream.start() + stream.feed(chunk) ... + stream.finish()

Content blocks: `text`, `image` (base64 or url source -> an image part), `tool_use` (an
assistant tool call, `input` as JSON text), `tool_result` (a `tool` message; string or text
blocks; `is_error` prefixes "Error: "), `thinking` (the assistant's `reasoning_content`);
`redacted_thinking` is dropped. Structured output: `output_config.format` (json_schema). `tool_choice`: auto -> "auto", any -> "required", tool ->
a named function, none -> no tools at all. Tools of other types than custom ones (Anthropic's
server tools) are not offered to the model. `metadata`, `service_tier` and cache_control are
accepted and ignored.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from typing import Any

from routerd.api.translate.fields import get_bool, get_list, get_str, json_type, require_object
from routerd.api.translate.tools import system_first
from routerd.errors import BadRequest

__all__ = ["PING", "MessageStream", "count_request", "encode_event", "error_event", "error_object", "error_type",
           "message_response", "messages_request", "new_message_id", "stop_reason"]

_COMPACT = (",", ":")
_encode = json.JSONEncoder(ensure_ascii=False, separators=_COMPACT).encode


def new_message_id() -> str:
    return "msg_" + uuid.uuid4().hex[:24]


# --- requests ----------------------------------------------------------------------------


def messages_request(body: Any) -> dict[str, Any]:
    """A `/v1/messages` body -> a `/v1/chat/completions` body (model left to the caller)."""
    body = require_object(body)
    max_tokens = body.get("max_tokens")
    if type(max_tokens) is not int or max_tokens < 1:
        raise BadRequest(f"max_tokens: must be an integer >= 1, got {json_type(max_tokens)}")
    out = count_request(body)
    out["max_tokens"] = max_tokens
    stream = get_bool(body, "stream", False)
    out["stream"] = stream
    if stream:
        out["stream_options"] = {"include_usage": True}
    for key in ("temperature", "top_p"):
        value = body.get(key)
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise BadRequest(f"{key}: must be a number, got {json_type(value)}")
            out[key] = value
    top_k = body.get("top_k")
    if top_k is not None:
        if type(top_k) is not int:
            raise BadRequest(f"top_k: must be an integer, got {json_type(top_k)}")
        out["top_k"] = top_k
    fmt = _output_format(body)
    if fmt is not None:
        out["response_format"] = fmt
    stops = get_list(body, "stop_sequences")
    if stops:
        if not all(isinstance(s, str) for s in stops):
            raise BadRequest("stop_sequences: must be an array of strings")
        out["stop"] = stops
    return out


def _output_format(body: Mapping[str, Any]) -> dict[str, Any] | None:
    """Structured output: `output_config.format` (or the older `output_format`), a JSON
    schema the answer must match -> OpenAI `response_format`."""
    config = body.get("output_config")
    fmt = config.get("format") if isinstance(config, dict) else None
    if fmt is None:
        fmt = body.get("output_format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema" or not isinstance(
            fmt.get("schema"), dict):
        raise BadRequest('output_config.format: must be {"type": "json_schema", "schema": {...}}')
    return {"type": "json_schema", "json_schema": {"name": "output", "schema": fmt["schema"]}}


def count_request(body: Mapping[str, Any]) -> dict[str, Any]:
    """The prompt part of a Messages body (also `/v1/messages/count_tokens`): messages,
    system, tools, tool_choice, thinking."""
    messages: list[dict[str, Any]] = []
    system = _system(body.get("system"))
    if system:
        messages.append({"role": "system", "content": system})
    raw = get_list(body, "messages")
    if not raw:
        raise BadRequest("messages: at least one message is required")
    for i, m in enumerate(raw):
        messages.extend(_message(m, i))
    # one system message, first: the chat templates of most models accept no other
    out: dict[str, Any] = {"messages": system_first(messages)}
    tools = [_tool(t, i) for i, t in enumerate(get_list(body, "tools"))]
    tools = [t for t in tools if t is not None]
    choice = _tool_choice(body.get("tool_choice"), bool(tools))
    if tools and choice != "none":
        out["tools"] = tools
        if choice is not None:
            out["tool_choice"] = choice
        parallel = (body.get("tool_choice") or {}).get("disable_parallel_tool_use")
        if parallel is True:
            out["parallel_tool_calls"] = False
    _thinking(body.get("thinking"), out)
    return out


def _system(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = []
        for i, block in enumerate(value):
            if not isinstance(block, dict) or block.get("type") != "text":
                raise BadRequest(f"system[{i}]: only text blocks are accepted")
            texts.append(get_str(block, "text"))
        return "\n\n".join(texts)
    raise BadRequest(f"system: must be a string or an array of text blocks, got {json_type(value)}")


def _message(m: Any, i: int) -> list[dict[str, Any]]:
    where = f"messages[{i}]"
    if not isinstance(m, dict):
        raise BadRequest(f"{where}: must be an object, got {json_type(m)}")
    role = m.get("role")
    if role == "system":  # Claude Code 2.1 sends context this way (a string or text blocks)
        return [{"role": "system", "content": _system(m.get("content"))}]
    if role not in ("user", "assistant"):
        raise BadRequest(f'{where}.role: must be "user", "assistant" or "system", '
                         f'got {role!r}')
    content = m.get("content")
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    if not isinstance(content, list):
        raise BadRequest(f"{where}.content: must be a string or an array of content blocks")
    if role == "assistant":
        return [_assistant(content, where)]
    return _user(content, where)


def _block_type(block: Any, where: str) -> str:
    if not isinstance(block, dict) or not isinstance(block.get("type"), str):
        raise BadRequest(f"{where}: a content block must be an object with a type")
    kind: str = block["type"]
    return kind


def _assistant(blocks: list[Any], where: str) -> dict[str, Any]:
    texts: list[str] = []
    thinking: list[str] = []
    calls: list[dict[str, Any]] = []
    for j, block in enumerate(blocks):
        at = f"{where}.content[{j}]"
        kind = _block_type(block, at)
        if kind == "text":
            texts.append(get_str(block, "text"))
        elif kind == "thinking":
            thinking.append(get_str(block, "thinking"))
        elif kind == "redacted_thinking":
            continue
        elif kind == "tool_use":
            name = get_str(block, "name")
            if not name:
                raise BadRequest(f"{at}.name: must be a non-empty string")
            args = block.get("input", {})
            calls.append({"id": get_str(block, "id") or f"toolu_{j}", "type": "function",
                          "function": {"name": name, "arguments": _encode(args)}})
        else:
            raise BadRequest(f"{at}: content block type {kind!r} is not supported here")
    out: dict[str, Any] = {"role": "assistant", "content": "".join(texts)}
    if calls:
        out["tool_calls"] = calls
    if thinking:
        out["reasoning_content"] = "".join(thinking)
    return out


def _user(blocks: list[Any], where: str) -> list[dict[str, Any]]:
    """Tool results become `tool` messages (first, answering the previous tool calls); the
    rest one user message of content parts."""
    results: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    for j, block in enumerate(blocks):
        at = f"{where}.content[{j}]"
        kind = _block_type(block, at)
        if kind == "text":
            parts.append({"type": "text", "text": get_str(block, "text")})
        elif kind == "image":
            parts.append({"type": "image_url", "image_url": {"url": _image_url(block, at)}})
        elif kind == "tool_result":
            text = _result_text(block.get("content"), at)
            if block.get("is_error") is True:
                text = "Error: " + text
            results.append({"role": "tool", "tool_call_id": get_str(block, "tool_use_id"),
                            "content": text})
        elif kind == "document":
            source = block.get("source") or {}
            if source.get("type") != "text":
                raise BadRequest(f"{at}: only text documents are supported")
            parts.append({"type": "text", "text": get_str(source, "data")})
        else:
            raise BadRequest(f"{at}: content block type {kind!r} is not supported here")
    out = list(results)
    if parts:
        if all(p["type"] == "text" for p in parts):
            out.append({"role": "user", "content": "".join(p["text"] for p in parts)})
        else:
            out.append({"role": "user", "content": parts})
    return out


def _image_url(block: Mapping[str, Any], at: str) -> str:
    source = block.get("source")
    if not isinstance(source, dict):
        raise BadRequest(f"{at}.source: must be an object")
    kind = source.get("type")
    if kind == "base64":
        media = get_str(source, "media_type") or "image/jpeg"
        return f"data:{media};base64,{get_str(source, 'data')}"
    if kind == "url":
        return get_str(source, "url")
    raise BadRequest(f"{at}.source.type: must be \"base64\" or \"url\", got {kind!r}")


def _result_text(content: Any, at: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for block in content:
            if isinstance(block, dict) and block.get("type") == "text":
                texts.append(str(block.get("text", "")))
            else:
                raise BadRequest(f"{at}.content: only text blocks are supported in tool results")
        return "".join(texts)
    raise BadRequest(f"{at}.content: must be a string or an array of text blocks")


def _tool(tool: Any, i: int) -> dict[str, Any] | None:
    if not isinstance(tool, dict):
        raise BadRequest(f"tools[{i}]: must be an object, got {json_type(tool)}")
    if tool.get("type") not in (None, "custom"):
        return None  # a server tool (web_search, bash, ...): not something a local model runs
    name = get_str(tool, "name")
    if not name:
        raise BadRequest(f"tools[{i}].name: must be a non-empty string")
    schema = tool.get("input_schema")
    if not isinstance(schema, dict):
        raise BadRequest(f"tools[{i}].input_schema: must be a JSON schema object")
    fn: dict[str, Any] = {"name": name, "parameters": schema}
    if tool.get("description"):
        fn["description"] = get_str(tool, "description")
    return {"type": "function", "function": fn}


def _tool_choice(choice: Any, have_tools: bool) -> Any:
    if choice is None:
        return None
    if not isinstance(choice, dict):
        raise BadRequest(f"tool_choice: must be an object, got {json_type(choice)}")
    kind = choice.get("type")
    if kind == "auto":
        return "auto"
    if kind == "none":
        return "none"
    if kind == "any":
        if not have_tools:
            raise BadRequest('tool_choice: "any" needs at least one tool')
        return "required"
    if kind == "tool":
        name = get_str(choice, "name")
        if not name:
            raise BadRequest('tool_choice.name: required when type is "tool"')
        return {"type": "function", "function": {"name": name}}
    raise BadRequest(f'tool_choice.type: must be "auto", "any", "tool" or "none", got {kind!r}')


def _thinking(value: Any, out: dict[str, Any]) -> None:
    if value is None:
        return
    if not isinstance(value, dict):
        raise BadRequest(f"thinking: must be an object, got {json_type(value)}")
    kind = value.get("type")
    if kind == "enabled":
        out["chat_template_kwargs"] = {"enable_thinking": True}
        budget = value.get("budget_tokens")
        if type(budget) is int and budget > 0:
            out["reasoning_budget_tokens"] = budget
    elif kind == "disabled":
        out["chat_template_kwargs"] = {"enable_thinking": False}
    elif kind not in ("adaptive", "between_tools"):
        raise BadRequest(f'thinking.type: must be "enabled", "disabled" or "adaptive", '
                         f'got {kind!r}')


# --- responses ---------------------------------------------------------------------------


def stop_reason(finish_reason: Any) -> str:
    """OpenAI finish_reason -> Anthropic stop_reason."""
    if finish_reason == "length":
        return "max_tokens"
    if finish_reason in ("tool_calls", "function_call"):
        return "tool_use"
    if finish_reason == "content_filter":
        return "refusal"
    return "end_turn"


def _usage(usage: Mapping[str, Any] | None, timings: Mapping[str, Any] | None = None
           ) -> dict[str, int]:
    p = e = 0
    if usage:
        p, e = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
    elif timings:
        p = int((timings.get("prompt_n") or 0) + (timings.get("cache_n") or 0))
        e = int(timings.get("predicted_n") or 0)
    return {"input_tokens": p, "output_tokens": e, "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0}


def parse_input(arguments: Any) -> Any:
    """Tool-call arguments (JSON text) -> the `input` object; text that is no object stays
    reachable under `_raw`, never lost."""
    if isinstance(arguments, dict):
        return arguments
    if not isinstance(arguments, str) or not arguments.strip():
        return {}
    try:
        value = json.loads(arguments)
    except ValueError:
        return {"_raw": arguments}
    return value if isinstance(value, dict) else {"_raw": arguments}


def message_response(reply: Mapping[str, Any], model: str,
                     msg_id: str | None = None) -> dict[str, Any]:
    """A non-streamed chat reply -> an Anthropic message."""
    choices = reply.get("choices") or [{}]
    choice = choices[0] if isinstance(choices[0], dict) else {}
    msg = choice.get("message") or {}
    content: list[dict[str, Any]] = []
    if msg.get("reasoning_content"):
        content.append({"type": "thinking", "thinking": msg["reasoning_content"],
                        "signature": ""})
    if msg.get("content"):
        content.append({"type": "text", "text": msg["content"]})
    for call in msg.get("tool_calls") or []:
        fn = call.get("function") or {}
        content.append({"type": "tool_use", "id": call.get("id") or "toolu_0",
                        "name": fn.get("name") or "", "input": parse_input(fn.get("arguments"))})
    if not content:
        content.append({"type": "text", "text": ""})
    reason = choice.get("finish_reason")
    if msg.get("tool_calls") and reason != "length":
        reason = "tool_calls"
    return {"id": msg_id or new_message_id(), "type": "message", "role": "assistant",
            "model": model, "content": content, "stop_reason": stop_reason(reason),
            "stop_sequence": None, "usage": _usage(reply.get("usage"), reply.get("timings"))}


_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                403: "permission_error", 404: "not_found_error", 413: "request_too_large",
                429: "rate_limit_error", 503: "overloaded_error", 529: "overloaded_error"}


def error_type(status: int) -> str:
    """Anthropic's error type for an HTTP status."""
    if status in _ERROR_TYPES:
        return _ERROR_TYPES[status]
    return "invalid_request_error" if status < 500 else "api_error"


def error_object(kind: str, message: str) -> dict[str, Any]:
    """Anthropic's error body (also the data of an in-band `error` event)."""
    return {"type": "error", "error": {"type": kind, "message": message}}


def encode_event(name: str, data: Mapping[str, Any]) -> bytes:
    """`event: NAME` + `data: JSON`, as Anthropic frames every stream event."""
    return b"event: " + name.encode() + b"\ndata: " + _encode(data).encode() + b"\n\n"


def error_event(message: str, kind: str = "api_error") -> bytes:
    return encode_event("error", error_object(kind, message))


PING = encode_event("ping", {"type": "ping"})


class MessageStream:
    """Chat-completion chunks -> Anthropic stream events (as encoded bytes).

    Blocks open in the order the engine sends them (thinking, text, each tool call) and each
    closes before the next opens. Usage comes from the engine's last chunk."""

    def __init__(self, model: str, msg_id: str | None = None) -> None:
        self.model = model
        self.id = msg_id or new_message_id()
        self._index = -1
        self._open: str | None = None  # "text" | "thinking" | "tool:<engine index>"
        self._finish: str | None = None
        self._tool = False
        self._usage: Mapping[str, Any] | None = None
        self._timings: Mapping[str, Any] | None = None
        self.started = False

    def start(self) -> bytes:
        self.started = True
        message: dict[str, Any] = {"id": self.id, "type": "message", "role": "assistant", "model": self.model,
                   "content": [], "stop_reason": None, "stop_sequence": None,
                   "usage": _usage(None)}
        return encode_event("message_start", {"type": "message_start", "message": message})

    def _close(self) -> bytes:
        if self._open is None:
            return b""
        self._open = None
        return encode_event("content_block_stop",
                            {"type": "content_block_stop", "index": self._index})

    def _begin(self, key: str, block: dict[str, Any]) -> bytes:
        out = self._close()
        self._index += 1
        self._open = key
        return out + encode_event("content_block_start", {
            "type": "content_block_start", "index": self._index, "content_block": block})

    def _delta(self, delta: dict[str, Any]) -> bytes:
        return encode_event("content_block_delta", {
            "type": "content_block_delta", "index": self._index, "delta": delta})

    def feed(self, chunk: Mapping[str, Any]) -> bytes:
        if chunk.get("usage"):
            self._usage = chunk["usage"]
        if chunk.get("timings"):
            self._timings = chunk["timings"]
        choices = chunk.get("choices")
        if not choices:
            return b""
        choice = choices[0]
        delta = choice.get("delta") or {}
        out = b""
        thinking = delta.get("reasoning_content")
        if thinking:
            if self._open != "thinking":
                out += self._begin("thinking", {"type": "thinking", "thinking": "",
                                                "signature": ""})
            out += self._delta({"type": "thinking_delta", "thinking": thinking})
        text = delta.get("content")
        if text:
            if self._open != "text":
                out += self._begin("text", {"type": "text", "text": ""})
            out += self._delta({"type": "text_delta", "text": text})
        for call in delta.get("tool_calls") or []:
            out += self._tool_delta(call)
        if choice.get("finish_reason"):
            self._finish = choice["finish_reason"]
        return out

    def _tool_delta(self, call: Mapping[str, Any]) -> bytes:
        fn = call.get("function") or {}
        idx = call.get("index", 0)
        key = f"tool:{idx}"
        out = b""
        if self._open != key and (call.get("id") or fn.get("name")):
            self._tool = True
            out += self._begin(key, {"type": "tool_use", "id": call.get("id") or f"toolu_{idx}",
                                     "name": fn.get("name") or "", "input": {}})
        args = fn.get("arguments")
        if args and self._open == key:
            if not isinstance(args, str):
                args = _encode(args)
            out += self._delta({"type": "input_json_delta", "partial_json": args})
        return out

    def ping(self) -> bytes:
        return PING

    def error(self, message: str, kind: str = "api_error") -> bytes:
        """The in-band end of a stream whose engine failed: Anthropic's `error` event."""
        return error_event(message, kind)

    def finish(self) -> bytes:
        """Close the open block; `message_delta` (stop_reason, usage) and `message_stop`."""
        out = self._close()
        reason = self._finish
        if self._tool and reason != "length":
            reason = "tool_calls"
        usage = _usage(self._usage, self._timings)
        out += encode_event("message_delta", {
            "type": "message_delta",
            "delta": {"stop_reason": stop_reason(reason), "stop_sequence": None},
            "usage": usage})
        return out + encode_event("message_stop", {"type": "message_stop"})
