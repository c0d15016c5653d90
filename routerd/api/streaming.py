"""Answer relays: same-dialect bytes untouched, or re-encoded through the translators.

Once a stream has started, an engine failure goes in-band (an SSE error event or an NDJSON
`{"error": ...}` line) and the stream ends: never a hang, never a silent truncation. A stream
counts as finished only when its last event says so (`[DONE]`, llama.cpp's `"stop": true`, or
the engine's own error event); anything else is reported as a broken stream. How the engine
broke is the dispatcher's to say (routerd/dispatch.py); this module only encodes it.

A client that leaves makes its write fail (or its handler cancelled): that propagates, the
engine call's context closes the upstream connection, and the engine stops generating.
"""

from __future__ import annotations

import json
from typing import Any, Callable

from aiohttp import web

from ..activity import note, note_call, note_usage
from ..dispatch import Call, StreamBroken
from .translate import sse as sse_codec
from .translate.ollama_response import error_chunk_ollama

_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no"}
_NDJSON_HEADERS = {"Content-Type": "application/x-ndjson"}
_TAIL_MAX = 1 << 16


def _client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


def _keep_tail(tail: bytes, chunk: bytes) -> bytes:
    """Enough of the stream's end to hold its last event, without copying on every chunk."""
    if b"data:" in chunk:
        return chunk
    return (tail + chunk)[-_TAIL_MAX:]


def ended_well(tail: bytes) -> bool:
    """Whether the last SSE event in `tail` finishes the stream."""
    at = tail.rfind(b"data:")
    if at < 0:
        return False
    event = tail[at + 5:].strip()
    if event == b"[DONE]":
        return True
    try:
        obj = json.loads(event)
    except ValueError:
        return False
    return isinstance(obj, dict) and (obj.get("stop") is True or "error" in obj)


async def relay_sse(request: web.Request, call: Call, *,
                    finished: Callable[[bytes], bool] = ended_well,
                    error_event: Callable[[str], bytes] = sse_codec.error_event_openai,
                    ) -> web.StreamResponse:
    """Same dialect: relay the engine's SSE bytes untouched; check the stream ended with its
    dialect's last event (`finished`: `[DONE]`, or `"stop": true` on llama.cpp's native
    stream), else end it with `error_event`."""
    resp = web.StreamResponse(status=call.response.status, headers=_SSE_HEADERS)
    await resp.prepare(request)
    note_call(request, call)
    tail = stats = b""
    try:
        async for chunk in call.chunks():
            await resp.write(chunk)
            tail = _keep_tail(tail, chunk)
            if b'"timings"' in chunk or b'"usage"' in chunk:
                stats = chunk  # the engine's token counts, for the activity log
        note_usage(request, stats)
        if not finished(tail):
            await resp.write(error_event(await call.ended_early()))
    except StreamBroken as e:
        if _client_gone(request):
            raise e.cause from None
        why = await call.broken(e)
        note(request, error=why)
        await resp.write(error_event(why))
    await resp.write_eof()
    return resp


async def relay_body(call: Call) -> web.Response:
    """Non-streaming same dialect: the engine's body, status and content type untouched."""
    body = await call.read()
    ctype = call.response.headers.get("Content-Type", "application/json")
    return web.Response(body=body, status=call.response.status, headers={"Content-Type": ctype})


async def relay_translated(request: web.Request, call: Call, stream: Any,
                           encode: Callable[[Any], bytes]) -> web.StreamResponse:
    """Other dialect: decode the engine's SSE, feed the converter, write NDJSON lines."""
    resp = web.StreamResponse(status=200, headers=_NDJSON_HEADERS)
    await resp.prepare(request)
    note_call(request, call)
    decoder = sse_codec.SSEDecoder()
    try:
        done = False
        async for chunk in call.chunks():
            if await _translate(resp, decoder, stream, encode, chunk):
                done = True
                break
        if not done:
            raise _InBand(await call.ended_early())
        final = stream.finish(load_ns=call.load_ns, total_ns=call.total_ns())
        note_usage(request, final)
        await resp.write(encode(final))
    except _InBand as e:
        note(request, error=str(e))
        await resp.write(encode(error_chunk_ollama(str(e))))
    except StreamBroken as e:
        if _client_gone(request):
            raise e.cause from None
        why = await call.broken(e)
        note(request, error=why)
        await resp.write(encode(error_chunk_ollama(why)))
    await resp.write_eof()
    return resp


async def _translate(resp: web.StreamResponse, decoder: sse_codec.SSEDecoder, stream: Any,
                     encode: Callable[[Any], bytes], chunk: bytes) -> bool:
    """Feed one upstream chunk; write what it makes; True once `[DONE]` is seen."""
    out = bytearray()
    done = False
    for data in decoder.feed(chunk):
        if data == "[DONE]":
            done = True
            break
        try:
            obj = json.loads(data)
        except ValueError:
            continue
        if "error" in obj and not obj.get("choices"):
            if out:
                await resp.write(bytes(out))
            raise _InBand(_error_message(obj))
        for o in stream.feed(obj):
            out += encode(o)
    if out:
        await resp.write(bytes(out))
    return done


class _InBand(Exception):
    pass


def _error_message(obj: dict[str, Any]) -> str:
    err = obj.get("error")
    if isinstance(err, dict):
        return str(err.get("message", err))
    return str(err)
