"""Server-sent events: an incremental decoder for engine streams, and encoders.

`SSEDecoder.feed` takes bytes as they arrive (any split: mid-line, mid-UTF-8 character,
between `\\r` and `\\n`) and returns the `data` payload of each complete event. Comment lines
(`: ping`) and other fields (`event:`, `id:`, `retry:`) are skipped; several `data:` lines in
one event are joined with `\\n`, per the WHATWG spec. `[DONE]` comes back as-is.
"""

from __future__ import annotations

import json
from typing import Any, Callable

__all__ = ["DONE", "SSEDecoder", "encode_ndjson", "encode_sse", "ended_anthropic",
           "ended_responses", "error_event_openai", "stream_finisher"]

DONE = "[DONE]"
# One encoder, built once: json.dumps(..., separators=...) builds a new one per call.
_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
_NL = b"\n"
_CR = b"\r"
_COLON = 0x3A


class SSEDecoder:
    """Incremental SSE parser: bytes in, complete events' data payloads out."""

    __slots__ = ("_buf", "_data", "_cr")

    def __init__(self) -> None:
        self._buf = b""  # an incomplete line
        self._data: list[bytes] | None = None  # data lines of the event being read
        self._cr = False  # the last read ended with \r: its \n may be next

    def feed(self, data: bytes) -> list[str]:
        if self._cr and data:
            self._cr = False
            if data[:1] == _NL:
                data = data[1:]  # the second half of a \r\n already counted as a line end
        if _CR in data:
            if data[-1:] == _CR:
                self._cr = True
            data = data.replace(b"\r\n", _NL).replace(_CR, _NL)
        end = data.rfind(_NL)
        if end < 0:
            self._buf += data
            return []
        lines = (self._buf + data[:end]).split(_NL) if self._buf else data[:end].split(_NL)
        self._buf = data[end + 1:]
        out: list[str] = []
        for line in lines:
            if not line:
                self._dispatch(out)
            elif line[0] != _COLON:
                self._field(line)
        return out

    def flush(self) -> list[str]:
        """At end of stream: the last event if the server left off its final blank line.

        The SSE spec discards such an event; engines never send one, proxies may."""
        out: list[str] = []
        if self._buf:
            if self._buf[0] != _COLON:
                self._field(self._buf)
            self._buf = b""
        self._dispatch(out)
        return out

    def _field(self, line: bytes) -> None:
        if line[:5] == b"data:":
            value = line[6:] if line[5:6] == b" " else line[5:]
        elif line == b"data":
            value = b""
        else:
            return  # event:, id:, retry: and unknown fields mean nothing here
        if self._data is None:
            self._data = [value]
        else:
            self._data.append(value)

    def _dispatch(self, out: list[str]) -> None:
        data = self._data
        if data is not None:
            self._data = None
            payload = data[0] if len(data) == 1 else _NL.join(data)
            out.append(payload.decode("utf-8", "replace"))


def encode_sse(obj: Any) -> bytes:
    """One SSE event: `data: <compact JSON>\\n\\n`; a str (e.g. "[DONE]") is sent verbatim."""
    if isinstance(obj, str):
        return b"data: " + obj.encode() + b"\n\n"
    return b"data: " + _encode(obj).encode("utf-8", "replace") + b"\n\n"


class ModelRenamer:
    """An OpenAI-style stream re-encoded with each event's `model` set to the name the client
    asked for (an alias: llama-server's completions answer with their own name)."""

    __slots__ = ("name", "_decoder")

    def __init__(self, name: str) -> None:
        self.name = name
        self._decoder = SSEDecoder()

    def feed(self, data: bytes) -> bytes:
        return b"".join(self._event(p) for p in self._decoder.feed(data))

    def _event(self, payload: str) -> bytes:
        try:
            obj = json.loads(payload)
        except ValueError:
            return encode_sse(payload)  # "[DONE]"
        return encode_sse(renamed(obj, self.name))


def renamed(obj: Any, name: str) -> Any:
    """`obj` with its `model` field (if it has one) set to `name`."""
    if isinstance(obj, dict) and "model" in obj:
        obj["model"] = name
    return obj


def encode_ndjson(obj: Any) -> bytes:
    """One NDJSON line (Ollama streams): compact JSON and a newline."""
    return _encode(obj).encode("utf-8", "replace") + b"\n"


def error_event_openai(
    msg: str, *, code: str | int | None = "upstream_error", err_type: str = "server_error"
) -> bytes:
    """An in-band error for an OpenAI stream that has already started."""
    return encode_sse({"error": {"message": msg, "type": err_type, "code": code}})



_RESPONSES_END = frozenset({"response.completed", "response.incomplete", "response.failed",
                            "error"})
_ANTHROPIC_END = frozenset({"message_stop", "error"})


def _last_type(tail: bytes) -> str:
    """The `type` of the last SSE event's JSON data in `tail` ("" when none)."""
    at = tail.rfind(b"data:")
    if at < 0:
        return ""
    try:
        obj = json.loads(tail[at + 5:].strip())
    except ValueError:
        return ""
    kind = obj.get("type") if isinstance(obj, dict) else None
    return kind if isinstance(kind, str) else ""


def ended_responses(tail: bytes) -> bool:
    """An OpenAI Responses stream ends with `response.completed` (or `.incomplete`,
    `.failed`, an `error` event); it sends no `[DONE]`."""
    return _last_type(tail) in _RESPONSES_END


def ended_anthropic(tail: bytes) -> bool:
    """An Anthropic Messages stream ends with `message_stop` (or an `error` event)."""
    return _last_type(tail) in _ANTHROPIC_END


def stream_finisher(path: str) -> Callable[[bytes], bool] | None:
    """The end-of-stream rule for an engine path relayed as is (`/upstream/<model>/<path>`):
    Responses and Anthropic streams end with their own last event; None for the others
    (`[DONE]`, or llama.cpp's `"stop": true`: the relay's default)."""
    clean = "/" + path.strip("/")
    if clean.endswith("/responses"):
        return ended_responses
    if clean.endswith("/messages"):
        return ended_anthropic
    return None
