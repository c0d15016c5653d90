"""Dialects served over the engine's chat completions (Anthropic Messages, OpenAI Responses,
and forced tool calls in every dialect).

A handler translates its request to a chat body (api/translate/), then:

    reply = await chat_reply(request, name, chat)                 # whole, forced tools done
    return await chat_stream(request, name, chat, converter)      # SSE in the route's dialect
    n = await count_tokens(request, name, chat)

A forced tool choice (`tools.forced_choice`) is decoded under the tools' JSON schema and the
answer rebuilt as a tool call (non-streamed from the engine; a stream replays it whole).

Streams: while the lease waits (a queue, a cold load) the one keep-alive mechanism of
api/streaming.py (`open_call`) runs: nothing for `PING_AFTER` seconds, so an early failure
(unknown model, full queue) is still a plain HTTP error; after that the stream starts and a
`: loading NN%` comment, with the converter's own keep-alive event where it has one
(Anthropic's `ping`), goes out every `PING_EVERY` seconds until the engine answers. Once
started, an engine failure goes in-band in the converter's dialect and the stream ends
cleanly.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Protocol

from aiohttp import web

from .. import keys
from ..dispatch import Call, StreamBroken
from ..errors import BadRequest, RouterdError, UpstreamError
from .common import engine_call, keep_alive_field
from .streaming import loading_comment, open_call
from .translate import tools
from .translate.schema import bound_body, string_bound
from .translate.sse import DONE, SSEDecoder, encode_sse, error_event_openai

_compact = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode

CHAT_PATH = "/v1/chat/completions"
COUNT_PATH = "/v1/chat/completions/input_tokens"  # llama-server's; routerd's worker lacks it
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
               "X-Accel-Buffering": "no"}


class Converter(Protocol):
    """Chat chunks -> one dialect's stream events, as bytes."""

    def start(self) -> bytes: ...

    def feed(self, chunk: dict[str, Any]) -> bytes: ...

    def finish(self) -> bytes: ...

    def ping(self) -> bytes: ...

    def error(self, message: str) -> bytes: ...


def _engine_body(request: web.Request, name: str, chat: dict[str, Any]
                 ) -> tuple[Any, dict[str, Any], tools.ToolForce | None]:
    entry = request.app[keys.CATALOG].resolve(name)
    if _has_images(chat) and not entry.launch.projector:
        raise BadRequest(f"model {name!r} does not support image input (no vision projector)")
    force = tools.forced_choice(chat)
    body = tools.enforce(chat, force) if force else dict(chat)
    if force:
        body["stream"] = False
        body.pop("stream_options", None)
    # free strings bounded, so the JSON always closes inside a slot (translate/schema.py)
    bound_body(body, string_bound(entry.launch.ctx_size, entry.launch.parallel))
    body["model"] = entry.name
    return entry, body, force


def _has_images(chat: dict[str, Any]) -> bool:
    for m in chat.get("messages") or ():
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list) and any(
                isinstance(p, dict) and p.get("type") == "image_url" for p in content):
            return True
    return False


def _call(request: web.Request, name: str, path: str, body: dict[str, Any], entry: Any,
          keep_alive: float | None) -> Call:
    data = json.dumps(body, ensure_ascii=False).encode()
    return engine_call(request, name, path, body=data, keep_alive=keep_alive, entry=entry)


async def chat_reply(request: web.Request, name: str, chat: dict[str, Any], *,
                     keep_alive: float | None = None) -> dict[str, Any]:
    """The engine's whole chat reply (`stream` forced off); a forced call rebuilt."""
    entry, body, force = _engine_body(request, name, {**chat, "stream": False})
    body.pop("stream_options", None)
    async with _call(request, name, CHAT_PATH, body, entry, keep_alive) as call:
        reply = await call.json()
    if not isinstance(reply, dict):
        raise UpstreamError("engine reply is not a JSON object")
    if force is not None:
        reply = tools.forced_reply(reply, force)
    return reply


async def count_tokens(request: web.Request, name: str, chat: dict[str, Any]) -> int:
    """Prompt tokens of a chat body, as the engine templates it: llama-server counts without
    generating; an engine without that route evaluates the prompt and makes one token."""
    entry, body, _ = _engine_body(request, name, {**chat, "stream": False})
    body.pop("stream_options", None)
    try:
        async with _call(request, name, COUNT_PATH, body, entry, None) as call:
            answer = await call.json()
        return int(answer["input_tokens"])
    except RouterdError as e:
        if e.status not in (404, 405, 501):
            raise
    body["max_tokens"] = 1
    async with _call(request, name, CHAT_PATH, body, entry, None) as call:
        answer = await call.json()
    return int((answer.get("usage") or {}).get("prompt_tokens") or 0)


def _client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


async def chat_stream(request: web.Request, name: str, chat: dict[str, Any],
                      converter: Converter, *, keep_alive: float | None = None,
                      usage: bool = True) -> web.StreamResponse:
    """Stream the engine's answer to `chat` through `converter` (`usage`: ask the engine
    for its usage chunk)."""
    entry, body, force = _engine_body(request, name, {**chat, "stream": True})
    if not force and usage:
        body["stream_options"] = {"include_usage": True}
    ctx = _call(request, name, CHAT_PATH, body, entry, keep_alive)
    resp = web.StreamResponse(status=200, headers=SSE_HEADERS)
    try:
        call = await open_call(request, resp, ctx, start=converter.start,
                               ping=_keepalive(converter))
    except RouterdError as e:
        if not resp.prepared:
            raise
        await resp.write(converter.error(e.message))
        await resp.write_eof()
        return resp
    try:
        if not resp.prepared:
            await resp.prepare(request)
            await resp.write(converter.start())
        if force is not None:
            reply = tools.forced_reply(await call.json(), force)
            chunks = tools.reply_chunks(reply)
            if not usage:
                chunks = [c for c in chunks if c["choices"]]
            out = b"".join(converter.feed(c) for c in chunks)
            await resp.write(out + converter.finish())
        else:
            await _relay(request, resp, call, converter)
        await resp.write_eof()
        return resp
    finally:
        await ctx.__aexit__(None, None, None)


def _keepalive(converter: Converter) -> Callable[[float | None], bytes]:
    """The `: loading NN%` comment, then the dialect's own keep-alive event unless that is a
    comment too (Anthropic: `event: ping`)."""
    own = converter.ping()
    extra = b"" if own.startswith(b":") else own
    return lambda progress: loading_comment(progress) + extra


async def _relay(request: web.Request, resp: web.StreamResponse, call: Call,
                 converter: Converter) -> None:
    decoder = SSEDecoder()
    try:
        async for raw in call.chunks():
            out = b""
            for data in decoder.feed(raw):
                if data == "[DONE]":
                    await resp.write(out + converter.finish())
                    return
                try:
                    obj = json.loads(data)
                except ValueError:
                    continue
                if isinstance(obj, dict) and "error" in obj and not obj.get("choices"):
                    await resp.write(out + converter.error(_message(obj)))
                    return
                out += converter.feed(obj)
            if out:
                await resp.write(out)
        await resp.write(converter.error(await call.ended_early()))
    except StreamBroken as e:
        if _client_gone(request):
            raise e.cause from None
        await resp.write(converter.error(await call.broken(e)))


def _message(obj: dict[str, Any]) -> str:
    err = obj.get("error")
    if isinstance(err, dict):
        return str(err.get("message", err))
    return str(err)


def keep_alive(body: dict[str, Any]) -> float | None:
    return keep_alive_field(body)


# --- OpenAI chat completions that routerd must answer itself -----------------------------


class OpenAIChunks:
    """Chat chunks -> the same OpenAI SSE, with the model name the client asked for."""

    def __init__(self, model: str) -> None:
        self.model = model

    def start(self) -> bytes:
        return b""

    def feed(self, chunk: dict[str, Any]) -> bytes:
        if "model" in chunk:
            chunk = {**chunk, "model": self.model}
        return encode_sse(chunk)

    def finish(self) -> bytes:
        return encode_sse(DONE)

    def ping(self) -> bytes:
        return b": ping\n\n"

    def error(self, message: str) -> bytes:
        return error_event_openai(message)


def needs_bridge(request: web.Request, name: str, body: dict[str, Any]) -> bool:
    """Whether a /v1/chat/completions body needs routerd rather than a byte relay: a forced
    tool choice, or a name (an alias) the engine does not answer with."""
    if tools.forced_choice(body) is not None:
        return True
    return request.app[keys.CATALOG].resolve(name).name != name


async def openai_chat(request: web.Request, name: str, body: dict[str, Any]
                      ) -> web.StreamResponse:
    """/v1/chat/completions answered by routerd (see `needs_bridge`), streamed or not."""
    keep_alive = keep_alive_field(body)
    if body.get("stream") is True:
        usage = isinstance(body.get("stream_options"), dict) and bool(
            body["stream_options"].get("include_usage"))
        return await chat_stream(request, name, body, OpenAIChunks(name),
                                 keep_alive=keep_alive, usage=usage)
    reply = await chat_reply(request, name, body, keep_alive=keep_alive)
    reply["model"] = name
    return web.json_response(reply, dumps=_compact)
