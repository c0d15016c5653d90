"""Answer relays: same-dialect bytes untouched, or re-encoded through the translators.

Once a stream has started, an engine failure goes in-band (an SSE error event or an NDJSON
`{"error": ...}` line) and the stream ends: never a hang, never a silent truncation.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, Callable

import aiohttp
import structlog
from aiohttp import web

from .. import keys
from .common import EngineCall
from .translate import sse as sse_codec
from .translate.ollama_response import error_chunk_ollama

log = structlog.get_logger(__name__)

_UPSTREAM_FAILURES = (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError,
                      asyncio.TimeoutError, asyncio.IncompleteReadError)
_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no"}
_NDJSON_HEADERS = {"Content-Type": "application/x-ndjson"}


async def _upstream_failed(request: web.Request, call: EngineCall, error: BaseException) -> str:
    scheduler = request.app[keys.SCHEDULER]
    if isinstance(error, asyncio.TimeoutError):
        await scheduler.kill_hung(call.runner, "a request saw no output within the idle timeout")
        return "engine stopped producing output (timed out); the worker was restarted"
    return f"engine failed mid-stream: {error or type(error).__name__}"


async def relay_sse(request: web.Request, call: EngineCall) -> web.StreamResponse:
    """Same dialect: relay the engine's SSE bytes untouched; check it ended with [DONE]."""
    resp = web.StreamResponse(status=call.resp.status, headers=_SSE_HEADERS)
    await resp.prepare(request)
    tail = b""
    try:
        async for chunk in call.resp.content.iter_any():
            await resp.write(chunk)
            tail = chunk[-64:] if len(chunk) >= 64 else (tail + chunk)[-64:]
        ended_well = b"[DONE]" in tail or b'"stop":true' in tail or b'"stop": true' in tail
        if not ended_well:
            reason = await _crashed_reason(request, call)
            await resp.write(sse_codec.error_event_openai(reason))
    except _UPSTREAM_FAILURES as e:
        await resp.write(sse_codec.error_event_openai(await _upstream_failed(request, call, e)))
    await resp.write_eof()
    return resp


async def _crashed_reason(request: web.Request, call: EngineCall) -> str:
    worker = call.runner.worker
    if worker.alive:
        await asyncio.wait({asyncio.ensure_future(worker.exited())}, timeout=0.5)
    code = worker.returncode
    return ("engine stream ended before completion"
            + (f" (engine exited with code {code})" if code is not None else ""))


async def relay_body(call: EngineCall) -> web.Response:
    """Non-streaming same dialect: the engine's body, status and content type untouched."""
    try:
        body = await call.resp.read()
    except _UPSTREAM_FAILURES as e:
        from ..errors import UpstreamError

        raise UpstreamError(f"engine failed while answering: {e or type(e).__name__}") from None
    ctype = call.resp.headers.get("Content-Type", "application/json")
    return web.Response(body=body, status=call.resp.status, headers={"Content-Type": ctype})


async def relay_translated(request: web.Request, call: EngineCall, stream: Any,
                           encode: Callable[[Any], bytes]) -> web.StreamResponse:
    """Other dialect: decode the engine's SSE, feed the converter, write NDJSON lines."""
    resp = web.StreamResponse(status=200, headers=_NDJSON_HEADERS)
    await resp.prepare(request)
    decoder = sse_codec.SSEDecoder()
    done = False
    try:
        async for chunk in call.resp.content.iter_any():
            out = bytearray()
            for data in decoder.feed(chunk):
                if data == "[DONE]":
                    done = True
                    break
                try:
                    obj = json.loads(data)
                except ValueError:
                    continue
                if "error" in obj and not obj.get("choices"):
                    raise _InBand(_error_message(obj))
                for o in stream.feed(obj):
                    out += encode(o)
            if out:
                await resp.write(bytes(out))
            if done:
                break
        if not done:
            raise _InBand(await _crashed_reason(request, call))
        final = stream.finish(load_ns=call.load_ns, total_ns=call.total_ns())
        await resp.write(encode(final))
    except _InBand as e:
        await resp.write(encode(error_chunk_ollama(str(e))))
    except _UPSTREAM_FAILURES as e:
        await resp.write(encode(error_chunk_ollama(await _upstream_failed(request, call, e))))
    await resp.write_eof()
    return resp


class _InBand(Exception):
    pass


def _error_message(obj: dict[str, Any]) -> str:
    err = obj.get("error")
    if isinstance(err, dict):
        return str(err.get("message", err))
    return str(err)
