"""Answer relays: same-dialect bytes untouched, or re-encoded through the translators.

Once a stream has started, an engine failure goes in-band (an SSE error event or an NDJSON
`{"error": ...}` line) and the stream ends: never a hang, never a silent truncation. A stream
counts as finished only when its last event says so (`[DONE]`, llama.cpp's `"stop": true`, or
the engine's own error event); anything else is reported as a broken stream.

A client that leaves makes its write fail (or its handler cancelled): that propagates, the
engine call's context closes the upstream connection, and the engine stops generating.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any, Callable

import aiohttp
import structlog
from aiohttp import web

from .. import keys
from ..errors import UpstreamError
from .common import EngineCall
from .translate import sse as sse_codec
from .translate.ollama_response import error_chunk_ollama

log = structlog.get_logger(__name__)

_UPSTREAM_FAILURES = (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError,
                      asyncio.TimeoutError, asyncio.IncompleteReadError)
_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no"}
_NDJSON_HEADERS = {"Content-Type": "application/x-ndjson"}
_TAIL_MAX = 1 << 16


def _client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


async def _upstream_failed(request: web.Request, call: EngineCall, error: BaseException) -> str:
    if isinstance(error, asyncio.TimeoutError):
        scheduler = request.app[keys.SCHEDULER]
        await scheduler.kill_hung(call.runner, "a request saw no output within the idle timeout")
        return "engine stopped producing output (timed out); the worker was restarted"
    if request.app[keys.SCHEDULER].closing:
        return "routerd is shutting down: the stream was cut at the drain deadline"
    reason = await _crashed_reason(call)
    return f"{reason}: {error}" if str(error) else reason


async def _crashed_reason(call: EngineCall) -> str:
    worker = call.runner.worker
    if worker.alive:  # a dying engine is reaped within milliseconds; say how it ended
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(worker.exited(), 0.5)
    code = worker.returncode
    return ("engine stream ended before completion"
            + (f" (engine exited with code {code})" if code is not None else ""))


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


async def relay_sse(request: web.Request, call: EngineCall) -> web.StreamResponse:
    """Same dialect: relay the engine's SSE bytes untouched; check it ended with its last
    event (`[DONE]`, or `"stop": true` on llama.cpp's native stream)."""
    resp = web.StreamResponse(status=call.resp.status, headers=_SSE_HEADERS)
    await resp.prepare(request)
    tail = call.first
    worker = call.runner.worker
    try:
        if call.first:
            await resp.write(call.first)
        async for chunk in call.resp.content.iter_any():
            worker.progress += 1
            await resp.write(chunk)
            tail = _keep_tail(tail, chunk)
        if not ended_well(tail):
            await resp.write(sse_codec.error_event_openai(await _crashed_reason(call)))
    except _UPSTREAM_FAILURES as e:
        if _client_gone(request):
            raise
        await resp.write(sse_codec.error_event_openai(await _upstream_failed(request, call, e)))
    await resp.write_eof()
    return resp


async def relay_body(call: EngineCall) -> web.Response:
    """Non-streaming same dialect: the engine's body, status and content type untouched."""
    try:
        body = call.first + await call.resp.read()
    except _UPSTREAM_FAILURES as e:
        raise UpstreamError(f"engine failed while answering: {e or type(e).__name__}") from None
    ctype = call.resp.headers.get("Content-Type", "application/json")
    return web.Response(body=body, status=call.resp.status, headers={"Content-Type": ctype})


async def relay_translated(request: web.Request, call: EngineCall, stream: Any,
                           encode: Callable[[Any], bytes]) -> web.StreamResponse:
    """Other dialect: decode the engine's SSE, feed the converter, write NDJSON lines."""
    resp = web.StreamResponse(status=200, headers=_NDJSON_HEADERS)
    await resp.prepare(request)
    decoder = sse_codec.SSEDecoder()
    try:
        done = await _translate(resp, decoder, stream, encode, call.first)
        if not done:
            worker = call.runner.worker
            async for chunk in call.resp.content.iter_any():
                worker.progress += 1
                if await _translate(resp, decoder, stream, encode, chunk):
                    done = True
                    break
        if not done:
            raise _InBand(await _crashed_reason(call))
        final = stream.finish(load_ns=call.load_ns, total_ns=call.total_ns())
        await resp.write(encode(final))
    except _InBand as e:
        await resp.write(encode(error_chunk_ollama(str(e))))
    except _UPSTREAM_FAILURES as e:
        if _client_gone(request):
            raise
        await resp.write(encode(error_chunk_ollama(await _upstream_failed(request, call, e))))
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
