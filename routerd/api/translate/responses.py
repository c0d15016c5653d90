"""OpenAI Responses <-> the engines' OpenAI chat completions (pure, no I/O).

    turn = input_messages(body)                       # this request's items as chat messages
    chat = responses_request(body, history + turn)    # -> /v1/chat/completions body
    obj = response_object(chat_reply, Echo(...))      # <- a non-streamed reply
    stream = ResponseStream(Echo(...))                # <- chunks, as Responses events
    later_history = history + turn + output_messages(obj["output"])

`history` is what a stored `previous_response_id` continued (the caller keeps it; the
`instructions` of earlier responses are not carried over, as OpenAI documents). Items:
`message` (string or `input_text` / `output_text` / `input_image` parts; role `developer`
becomes `system`), `function_call`, `function_call_output`; `reasoning` items are dropped
(their text is the model's own). Tools of other types than `function` (web_search,
file_search, computer use) are not offered to the model.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from routerd.api.translate.fields import get_list, get_str, json_type, require_object
from routerd.errors import BadRequest

__all__ = ["Echo", "ResponseStream", "encode_event", "input_messages", "new_id",
           "output_messages", "response_object", "responses_request"]

_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


# --- requests ----------------------------------------------------------------------------


def input_messages(body: Any) -> list[dict[str, Any]]:
    """`input` (a string or items) -> chat messages, without the instructions."""
    body = require_object(body)
    raw = body.get("input")
    if raw is None:
        return []
    if isinstance(raw, str):
        return [{"role": "user", "content": raw}]
    if not isinstance(raw, list):
        raise BadRequest(f"input: must be a string or an array of items, got {json_type(raw)}")
    out: list[dict[str, Any]] = []
    for i, item in enumerate(raw):
        _item(item, f"input[{i}]", out)
    return out


def _item(item: Any, at: str, out: list[dict[str, Any]]) -> None:
    if not isinstance(item, dict):
        raise BadRequest(f"{at}: must be an object, got {json_type(item)}")
    kind = item.get("type", "message")
    if kind == "message":
        role = item.get("role")
        if role not in ("user", "assistant", "system", "developer"):
            raise BadRequest(f"{at}.role: must be user, assistant, system or developer")
        content = _content(item.get("content"), at)
        out.append({"role": "system" if role == "developer" else role, "content": content})
    elif kind == "function_call":
        call = {"id": get_str(item, "call_id") or get_str(item, "id"), "type": "function",
                "function": {"name": get_str(item, "name"),
                             "arguments": get_str(item, "arguments") or "{}"}}
        last = out[-1] if out else None
        if last is not None and last["role"] == "assistant" and not last.get("_closed"):
            last.setdefault("tool_calls", []).append(call)
        else:
            out.append({"role": "assistant", "content": "", "tool_calls": [call]})
    elif kind == "function_call_output":
        output = item.get("output")
        text = output if isinstance(output, str) else _text_of(output)
        out.append({"role": "tool", "tool_call_id": get_str(item, "call_id"), "content": text})
    elif kind in ("reasoning", "item_reference"):
        return
    else:
        raise BadRequest(f"{at}.type: item type {kind!r} is not supported")


def _text_of(parts: Any) -> str:
    if isinstance(parts, list):
        return "".join(str(p.get("text", "")) for p in parts if isinstance(p, dict))
    return "" if parts is None else json.dumps(parts)


def _content(content: Any, at: str) -> Any:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise BadRequest(f"{at}.content: must be a string or an array of parts")
    parts: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text", "text", "summary_text"):
            parts.append({"type": "text", "text": get_str(part, "text")})
        elif kind == "refusal":
            parts.append({"type": "text", "text": get_str(part, "refusal")})
        elif kind == "input_image":
            url = part.get("image_url")
            if not isinstance(url, str) or not url:
                raise BadRequest(f"{at}.content[{j}].image_url: an image URL or data URI "
                                 "is required (file_id is not supported)")
            parts.append({"type": "image_url", "image_url": {"url": url}})
        else:
            raise BadRequest(f"{at}.content[{j}].type: part type {kind!r} is not supported")
    if all(p["type"] == "text" for p in parts):
        return "".join(p["text"] for p in parts)
    return parts


def _tools(body: Mapping[str, Any]) -> list[dict[str, Any]]:
    out = []
    for i, tool in enumerate(get_list(body, "tools")):
        if not isinstance(tool, dict):
            raise BadRequest(f"tools[{i}]: must be an object")
        if tool.get("type") != "function":
            continue  # hosted tools (web_search, file_search, ...) have no local runner
        name = get_str(tool, "name")
        if not name:
            raise BadRequest(f"tools[{i}].name: must be a non-empty string")
        fn: dict[str, Any] = {"name": name,
                              "parameters": tool.get("parameters") or {"type": "object"}}
        if tool.get("description"):
            fn["description"] = get_str(tool, "description")
        out.append({"type": "function", "function": fn})
    return out


def _tool_choice(choice: Any) -> Any:
    if choice is None or choice in ("auto", "none", "required"):
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function":
        return {"type": "function", "function": {"name": get_str(choice, "name")}}
    raise BadRequest('tool_choice: must be "auto", "none", "required" or '
                     '{"type": "function", "name": ...}')


def _format(body: Mapping[str, Any]) -> dict[str, Any] | None:
    text = body.get("text")
    if text is None:
        return None
    if not isinstance(text, dict):
        raise BadRequest(f"text: must be an object, got {json_type(text)}")
    fmt = text.get("format")
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        schema = fmt.get("schema")
        if not isinstance(schema, dict):
            raise BadRequest("text.format.schema: must be a JSON schema object")
        return {"type": "json_schema",
                "json_schema": {"name": fmt.get("name") or "schema", "schema": schema,
                                "strict": bool(fmt.get("strict"))}}
    raise BadRequest('text.format.type: must be "text", "json_object" or "json_schema"')


def responses_request(body: Any, messages: list[dict[str, Any]]) -> dict[str, Any]:
    """A `/v1/responses` body and the conversation so far -> a chat-completions body."""
    body = require_object(body)
    convo = [{k: v for k, v in m.items() if not k.startswith("_")} for m in messages]
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise BadRequest("instructions: must be a string")
    if instructions:
        convo.insert(0, {"role": "system", "content": instructions})
    if not convo:
        raise BadRequest("input: is required")
    out: dict[str, Any] = {"messages": convo}
    tools = _tools(body)
    choice = _tool_choice(body.get("tool_choice"))
    if tools and choice != "none":
        out["tools"] = tools
        if choice is not None:
            out["tool_choice"] = choice
        if isinstance(body.get("parallel_tool_calls"), bool):
            out["parallel_tool_calls"] = body["parallel_tool_calls"]
    limit = body.get("max_output_tokens")
    if limit is not None:
        if type(limit) is not int or limit < 1:
            raise BadRequest("max_output_tokens: must be an integer >= 1")
        out["max_tokens"] = limit
    for key in ("temperature", "top_p"):
        value = body.get(key)
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise BadRequest(f"{key}: must be a number, got {json_type(value)}")
            out[key] = value
    fmt = _format(body)
    if fmt is not None:
        out["response_format"] = fmt
    reasoning = body.get("reasoning")
    if isinstance(reasoning, dict) and isinstance(reasoning.get("effort"), str):
        out["reasoning_effort"] = reasoning["effort"]
    stream = body.get("stream") is True
    out["stream"] = stream
    if stream:
        out["stream_options"] = {"include_usage": True}
    return out


# --- responses ---------------------------------------------------------------------------


@dataclass
class Echo:
    """What a response object repeats of its request, and its identity."""

    model: str
    body: Mapping[str, Any] = field(default_factory=dict)
    id: str = field(default_factory=lambda: new_id("resp"))
    created_at: int = field(default_factory=lambda: int(time.time()))

    def shell(self, status: str) -> dict[str, Any]:
        b = self.body
        fmt = (b.get("text") or {}).get("format") if isinstance(b.get("text"), dict) else None
        return {
            "id": self.id, "object": "response", "created_at": self.created_at,
            "status": status, "background": False, "error": None, "incomplete_details": None,
            "instructions": b.get("instructions"), "max_output_tokens": b.get("max_output_tokens"),
            "model": self.model, "output": [],
            "parallel_tool_calls": b.get("parallel_tool_calls", True),
            "previous_response_id": b.get("previous_response_id"),
            "reasoning": {"effort": (b.get("reasoning") or {}).get("effort"), "summary": None},
            "store": b.get("store", True) is not False,
            "temperature": b.get("temperature", 1.0), "text": {"format": fmt or {"type": "text"}},
            "tool_choice": b.get("tool_choice", "auto"), "tools": b.get("tools") or [],
            "top_p": b.get("top_p", 1.0), "truncation": b.get("truncation", "disabled"),
            "usage": None, "user": b.get("user"), "metadata": b.get("metadata") or {},
        }


def _usage(usage: Mapping[str, Any] | None, timings: Mapping[str, Any] | None
           ) -> dict[str, Any]:
    p = e = 0
    if usage:
        p, e = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
    elif timings:
        p = int((timings.get("prompt_n") or 0) + (timings.get("cache_n") or 0))
        e = int(timings.get("predicted_n") or 0)
    return {"input_tokens": p, "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": e, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": p + e}


def _message_item(item_id: str, text: str, status: str = "completed") -> dict[str, Any]:
    return {"type": "message", "id": item_id, "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": [],
                         "logprobs": []}] if status == "completed" else []}


def _reasoning_item(item_id: str, text: str) -> dict[str, Any]:
    return {"type": "reasoning", "id": item_id, "summary": [],
            "content": [{"type": "reasoning_text", "text": text}]}


def _call_item(item_id: str, call_id: str, name: str, arguments: str,
               status: str = "completed") -> dict[str, Any]:
    return {"type": "function_call", "id": item_id, "call_id": call_id, "name": name,
            "arguments": arguments, "status": status}


def _finish(obj: dict[str, Any], finish_reason: Any) -> dict[str, Any]:
    if finish_reason == "length":
        obj["status"] = "incomplete"
        obj["incomplete_details"] = {"reason": "max_output_tokens"}
    else:
        obj["status"] = "completed"
    return obj


def response_object(reply: Mapping[str, Any], echo: Echo) -> dict[str, Any]:
    """A non-streamed chat reply -> a Response object."""
    choices = reply.get("choices") or [{}]
    choice = choices[0] if isinstance(choices[0], dict) else {}
    msg = choice.get("message") or {}
    output: list[dict[str, Any]] = []
    if msg.get("reasoning_content"):
        output.append(_reasoning_item(new_id("rs"), msg["reasoning_content"]))
    if msg.get("content") or not msg.get("tool_calls"):
        output.append(_message_item(new_id("msg"), msg.get("content") or ""))
    for call in msg.get("tool_calls") or []:
        fn = call.get("function") or {}
        args = fn.get("arguments")
        output.append(_call_item(new_id("fc"), call.get("id") or new_id("call"),
                                 fn.get("name") or "",
                                 args if isinstance(args, str) else _encode(args or {})))
    obj = echo.shell("completed")
    obj["output"] = output
    obj["usage"] = _usage(reply.get("usage"), reply.get("timings"))
    return _finish(obj, choice.get("finish_reason"))


def output_messages(output: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """A response's output items as chat messages, to continue the conversation."""
    msg: dict[str, Any] = {"role": "assistant", "content": ""}
    for item in output:
        if item.get("type") == "message":
            msg["content"] += "".join(p.get("text", "") for p in item.get("content") or [])
        elif item.get("type") == "function_call":
            msg.setdefault("tool_calls", []).append({
                "id": item.get("call_id"), "type": "function",
                "function": {"name": item.get("name"), "arguments": item.get("arguments")}})
    msg["_closed"] = True  # later function_call items start a new assistant turn
    return [msg]


def encode_event(data: Mapping[str, Any]) -> bytes:
    """`event: <type>` + `data: JSON`, as OpenAI frames Responses stream events."""
    return (b"event: " + str(data["type"]).encode() + b"\ndata: " + _encode(data).encode()
            + b"\n\n")


class ResponseStream:
    """Chat-completion chunks -> Responses stream events (encoded bytes), in the documented
    order: created, in_progress, then per output item added / deltas / done, completed."""

    def __init__(self, echo: Echo) -> None:
        self.echo = echo
        self._seq = 0
        self._output: list[dict[str, Any]] = []
        self._open: dict[str, Any] | None = None  # the item being streamed
        self._key: str | None = None  # "text" | "reasoning" | "tool:<index>"
        self._buf: list[str] = []
        self._finish: Any = None
        self._usage: Mapping[str, Any] | None = None
        self._timings: Mapping[str, Any] | None = None
        self.response: dict[str, Any] | None = None  # the completed object, at the end

    def _event(self, kind: str, **fields: Any) -> bytes:
        data = {"type": kind, "sequence_number": self._seq, **fields}
        self._seq += 1
        return encode_event(data)

    def start(self) -> bytes:
        shell = self.echo.shell("in_progress")
        return (self._event("response.created", response=shell)
                + self._event("response.in_progress", response=shell))

    def _close(self) -> bytes:
        item, key = self._open, self._key
        if item is None:
            return b""
        self._open = self._key = None
        idx = len(self._output)
        text = "".join(self._buf)
        self._buf = []
        out = b""
        if key == "text":
            done = _message_item(item["id"], text)
            part = done["content"][0]
            out += self._event("response.output_text.done", item_id=item["id"], output_index=idx,
                               content_index=0, text=text, logprobs=[])
            out += self._event("response.content_part.done", item_id=item["id"],
                               output_index=idx, content_index=0, part=part)
        elif key == "reasoning":
            done = _reasoning_item(item["id"], text)
            out += self._event("response.reasoning_text.done", item_id=item["id"],
                               output_index=idx, content_index=0, text=text)
        else:
            done = _call_item(item["id"], item["call_id"], item["name"], text or "{}")
            out += self._event("response.function_call_arguments.done", item_id=item["id"],
                               output_index=idx, name=item["name"], arguments=text or "{}")
        self._output.append(done)
        return out + self._event("response.output_item.done", output_index=idx, item=done)

    def _begin(self, key: str, item: dict[str, Any]) -> bytes:
        out = self._close()
        self._open, self._key = item, key
        idx = len(self._output)
        out += self._event("response.output_item.added", output_index=idx, item=item)
        if key == "text":
            out += self._event("response.content_part.added", item_id=item["id"],
                               output_index=idx, content_index=0,
                               part={"type": "output_text", "text": "", "annotations": []})
        return out

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
        idx = len(self._output)
        if delta.get("reasoning_content"):
            if self._key != "reasoning":
                out += self._begin("reasoning", {"type": "reasoning", "id": new_id("rs"),
                                                 "summary": [], "content": []})
                idx = len(self._output)
            self._buf.append(delta["reasoning_content"])
            out += self._event("response.reasoning_text.delta", item_id=self._open_id(),
                               output_index=idx, content_index=0,
                               delta=delta["reasoning_content"])
        if delta.get("content"):
            if self._key != "text":
                out += self._begin("text", _message_item(new_id("msg"), "", "in_progress"))
                idx = len(self._output)
            self._buf.append(delta["content"])
            out += self._event("response.output_text.delta", item_id=self._open_id(),
                               output_index=idx, content_index=0, delta=delta["content"],
                               logprobs=[])
        for call in delta.get("tool_calls") or []:
            out += self._tool_delta(call)
        if choice.get("finish_reason"):
            self._finish = choice["finish_reason"]
        return out

    def _open_id(self) -> str:
        assert self._open is not None
        item_id: str = self._open["id"]
        return item_id

    def _tool_delta(self, call: Mapping[str, Any]) -> bytes:
        fn = call.get("function") or {}
        key = f"tool:{call.get('index', 0)}"
        out = b""
        if self._key != key and (call.get("id") or fn.get("name")):
            out += self._begin(key, _call_item(new_id("fc"), call.get("id") or new_id("call"),
                                               fn.get("name") or "", "", "in_progress"))
        args = fn.get("arguments")
        if args and self._key == key:
            if not isinstance(args, str):
                args = _encode(args)
            self._buf.append(args)
            out += self._event("response.function_call_arguments.delta",
                               item_id=self._open_id(), output_index=len(self._output),
                               delta=args)
        return out

    def finish(self) -> bytes:
        """Close the open item, then `response.completed` (or `.incomplete` at the limit)."""
        out = self._close()
        if not self._output:  # nothing said: still one (empty) message, as OpenAI answers
            item = _message_item(new_id("msg"), "")
            self._output.append(item)
            out += self._event("response.output_item.added", output_index=0,
                               item={**item, "status": "in_progress", "content": []})
            out += self._event("response.output_item.done", output_index=0, item=item)
        obj = self.echo.shell("completed")
        obj["output"] = self._output
        obj["usage"] = _usage(self._usage, self._timings)
        _finish(obj, self._finish)
        self.response = obj
        kind = "response.incomplete" if obj["status"] == "incomplete" else "response.completed"
        return out + self._event(kind, response=obj)

    def ping(self) -> bytes:
        """A keep-alive while the engine loads: an SSE comment, which clients skip."""
        return b": ping\n\n"

    def error(self, message: str) -> bytes:
        return self.failed(message)

    def failed(self, message: str, code: str = "server_error") -> bytes:
        """The in-band end of a stream whose engine failed: `response.failed`."""
        self._close()
        obj = self.echo.shell("failed")
        obj["output"] = self._output
        obj["error"] = {"code": code, "message": message}
        return self._event("response.failed", response=obj)
