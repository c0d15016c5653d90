"""Streamed engine chunks (decoded SSE `data` objects) -> Ollama NDJSON objects.

One converter per request:

    stream = ChatStream(model)
    for payload in decoder.feed(data):          # SSEDecoder
        if payload == DONE: break
        for obj in stream.feed(json.loads(payload)):
            write(encode_ndjson(obj))
    write(encode_ndjson(stream.finish(load_ns=..., total_ns=...)))

`feed` raises `UpstreamError` for an in-band engine error (`{"error": ...}`); the caller
writes `error_chunk_ollama(msg)` and ends the stream. Chunks with nothing to say (the
role-only first delta, the usage-only last one) yield nothing. Tool calls, which OpenAI
streams as argument fragments, are gathered and sent whole once the finish_reason arrives,
or in the final object if it never does.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from routerd.api.translate.ollama_response import (
    check_error,
    done_reason,
    logprobs,
    metrics,
    native_done_reason,
    native_usage,
    now_rfc3339,
    ollama_tool_call,
)

__all__ = ["ChatStream", "GenerateStream"]


class _ToolCalls:
    """Accumulates OpenAI tool-call deltas by index until they are complete."""

    __slots__ = ("_calls", "_last")

    def __init__(self) -> None:
        self._calls: dict[int, list[Any]] = {}  # index -> [id, name, [argument fragments]]
        self._last = -1

    def __bool__(self) -> bool:
        return bool(self._calls)

    def add(self, deltas: Any) -> None:
        for d in deltas:
            idx = d.get("index")
            if not isinstance(idx, int):  # some engines omit it: an id starts a new call
                idx = self._last if self._last >= 0 and not d.get("id") else len(self._calls)
            self._last = idx
            entry = self._calls.get(idx)
            if entry is None:
                entry = self._calls[idx] = [None, "", []]
            if d.get("id"):
                entry[0] = d["id"]
            fn = d.get("function") or {}
            if fn.get("name"):
                entry[1] += fn["name"]
            args = fn.get("arguments")
            if isinstance(args, str):
                if args:
                    entry[2].append(args)
            elif args is not None:  # an engine that sends whole objects
                entry[2] = [json.dumps(args)]

    def drain(self) -> list[dict[str, Any]]:
        """The complete calls, in index order, as Ollama tool calls; then forget them."""
        calls = [
            ollama_tool_call(cid, name, "".join(parts), n)
            for n, (cid, name, parts) in enumerate(v for _, v in sorted(self._calls.items()))
        ]
        self._calls.clear()
        self._last = -1
        return calls


class _Stream:
    __slots__ = ("model", "_usage", "_timings", "_finish", "_chunks")

    def __init__(self, model: str) -> None:
        self.model = model
        self._usage: Mapping[str, Any] | None = None
        self._timings: Mapping[str, Any] | None = None
        self._finish: str | None = None  # the Ollama done_reason, once known
        self._chunks = 0  # text chunks sent: the eval count when the engine gives none

    def _note(self, chunk: Mapping[str, Any]) -> None:
        """Record the error, usage and timings a chunk may carry."""
        if "error" in chunk:
            check_error(chunk)
        usage = chunk.get("usage")
        if usage:
            self._usage = usage
        timings = chunk.get("timings")
        if timings:
            self._timings = timings

    def _metrics(self, load_ns: int, total_ns: int) -> dict[str, int]:
        return metrics(self._usage, self._timings, load_ns=load_ns, total_ns=total_ns,
                       eval_fallback=self._chunks)


class ChatStream(_Stream):
    """`/v1/chat/completions` chunks -> `/api/chat` NDJSON objects."""

    __slots__ = ("_calls",)

    def __init__(self, model: str) -> None:
        super().__init__(model)
        self._calls = _ToolCalls()

    def feed(self, chunk: Mapping[str, Any]) -> list[dict[str, Any]]:
        self._note(chunk)
        choices = chunk.get("choices")
        if not choices:
            return []
        choice = choices[0]
        delta = choice.get("delta")
        out: list[dict[str, Any]] = []
        if delta:
            content = delta.get("content")
            thinking = delta.get("reasoning_content")
            if content or thinking:
                msg: dict[str, Any] = {"role": "assistant", "content": content or ""}
                if thinking:
                    msg["thinking"] = thinking
                self._chunks += 1
                obj: dict[str, Any] = {"model": self.model, "created_at": now_rfc3339(),
                                       "message": msg, "done": False}
                lp = logprobs(choice)
                if lp:
                    obj["logprobs"] = lp
                out.append(obj)
            calls = delta.get("tool_calls")
            if calls:
                self._calls.add(calls)
        finish = choice.get("finish_reason")
        if finish:
            self._finish = done_reason(finish)
            if self._calls:
                msg = {"role": "assistant", "content": "", "tool_calls": self._calls.drain()}
                out.append({"model": self.model, "created_at": now_rfc3339(),
                            "message": msg, "done": False})
        return out

    def finish(self, *, load_ns: int, total_ns: int) -> dict[str, Any]:
        """The final `done: true` object, with metrics and any tool calls still held."""
        msg: dict[str, Any] = {"role": "assistant", "content": ""}
        if self._calls:
            msg["tool_calls"] = self._calls.drain()
        return {
            "model": self.model,
            "created_at": now_rfc3339(),
            "message": msg,
            "done": True,
            "done_reason": self._finish or "stop",
            **self._metrics(load_ns, total_ns),
        }


class GenerateStream(_Stream):
    """Chat, text-completion or native `/infill` chunks -> `/api/generate` NDJSON objects."""

    __slots__ = ()

    def feed(self, chunk: Mapping[str, Any]) -> list[dict[str, Any]]:
        self._note(chunk)
        thinking = None
        lp = None
        choices = chunk.get("choices")
        if choices:
            choice = choices[0]
            lp = logprobs(choice)
            text = choice.get("text")
            if text is None:
                delta = choice.get("delta")
                if delta:
                    text = delta.get("content")
                    thinking = delta.get("reasoning_content")
            finish = choice.get("finish_reason")
            if finish:
                self._finish = done_reason(finish)
        elif "content" in chunk:  # llama.cpp native (/infill)
            text = chunk["content"]
            if chunk.get("stop"):
                self._finish = native_done_reason(chunk.get("stop_type"))
                self._usage = self._usage or native_usage(chunk)
        else:
            return []
        if not text and not thinking:
            return []
        self._chunks += 1
        obj: dict[str, Any] = {"model": self.model, "created_at": now_rfc3339(),
                               "response": text or ""}
        if thinking:
            obj["thinking"] = thinking
        obj["done"] = False
        if lp:
            obj["logprobs"] = lp
        return [obj]

    def finish(self, *, load_ns: int, total_ns: int) -> dict[str, Any]:
        """The final `done: true` object with done_reason and metrics."""
        return {
            "model": self.model,
            "created_at": now_rfc3339(),
            "response": "",
            "done": True,
            "done_reason": self._finish or "stop",
            **self._metrics(load_ns, total_ns),
        }
