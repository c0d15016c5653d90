"""Answer relays: same-dialect bytes untouched, or re-encoded through the translators.

Once a stream has started, an engine failure goes in-band (an SSE error event or an NDJSON
`{"error": ...}` line) and the stream ends: never a hang, never a silent truncation. A stream
counts as finished only when its last event says so (`[DONE]`, llama.cpp's `"stop": true`, or
the engine's own error event); anything else is reported as a broken stream. How the engine
broke is the dispatcher's to say (routerd/dispatch.py); this module only encodes it.

A client that leaves makes its write fail (or its handler cancelled): that propagates, the
engine call's context closes the upstream connection, and the engine stops generating.

While a streamed request waits for its lease (a queue, a cold load) `open_call` keeps the
client's stream alive: nothing for `PING_AFTER` seconds (an early failure, an unknown model or
a full queue, is still a plain HTTP error), then the stream starts and a keep-alive goes out
every `PING_EVERY` seconds: an SSE comment `: loading NN%` (clients skip comments; the
progress is the scheduler's, scheduler/progress.py), plus the dialect's own ping event where
it has one (Anthropic's `ping`). From then on an error goes in-band in the dialect's shape.
NDJSON (Ollama) streams get nothing: every line must be a JSON object (ollama-python
json.loads every line, a blank one raises), and an empty chunk would be a token Ollama never
sends; a load's progress is on /api/events and /api/ps instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any, Callable

from aiohttp import web

from .. import keys
from ..activity import note, note_call, note_usage
from ..dispatch import Call, StreamBroken
from ..errors import RouterdError
from .translate import sse as sse_codec
from .translate.ollama_response import error_chunk_ollama

_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no"}
_NDJSON_HEADERS = {"Content-Type": "application/x-ndjson"}
_TAIL_MAX = 1 << 16
PING_AFTER = 1.0
PING_EVERY = 5.0
_CLIENT_GONE = (ConnectionResetError, BrokenPipeError, RuntimeError)  # closing transport


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


def loading_comment(progress: float | None) -> bytes:
    """The keep-alive comment: `: loading NN%` while the model loads, else `: queued`."""
    if progress is None:
        return b": queued\n\n"
    return b": loading %d%%\n\n" % int(progress * 100)


class _Pinger:
    """Writes the stream's keep-alives from a task of its own while the handler awaits the
    lease; costs one timer when the lease comes within PING_AFTER."""

    def __init__(self, request: web.Request, resp: web.StreamResponse, name: str,
                 start: Callable[[], bytes], ping: Callable[[float | None], bytes]) -> None:
        self.request, self.resp, self.name = request, resp, name
        self.start, self.ping = start, ping
        self.owner = asyncio.current_task()
        self.task: asyncio.Task[None] | None = None
        self.stopping = False
        self.wake: asyncio.Event | None = None
        loop = asyncio.get_running_loop()
        self.timer: asyncio.TimerHandle | None = loop.call_later(PING_AFTER, self._begin)

    def _begin(self) -> None:
        self.timer = None
        self.wake = asyncio.Event()
        self.task = asyncio.get_running_loop().create_task(self._run())

    def _progress(self) -> float | None:
        scheduler = self.request.app.get(keys.SCHEDULER)
        return scheduler.load_progress(self.name) if scheduler is not None else None

    async def _run(self) -> None:
        assert self.wake is not None
        try:
            if not self.resp.prepared:
                await self.resp.prepare(self.request)
                opening = self.start()
                if opening:
                    await self.resp.write(opening)
            while not self.stopping:
                await self.resp.write(self.ping(self._progress()))
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), PING_EVERY)
        except _CLIENT_GONE:
            # The client left while its request waited: it leaves the queue (the load goes
            # on unless nobody else wants it and abort_unwanted_loads is set).
            if not self.stopping and self.owner is not None:
                self.owner.cancel()

    async def stop(self) -> None:
        self.stopping = True
        if self.timer is not None:
            self.timer.cancel()
        if self.task is not None:
            assert self.wake is not None
            self.wake.set()
            await asyncio.wait({self.task})  # its current write, at most


async def open_call(request: web.Request, resp: web.StreamResponse, call: Call, *,
                    start: Callable[[], bytes] = lambda: b"",
                    ping: Callable[[float | None], bytes] = loading_comment) -> Call:
    """Enter `call` (lease, send, first chunk), keeping the client's stream alive meanwhile:
    after PING_AFTER s `resp` is prepared, `start()` written once, then `ping(progress)` every
    PING_EVERY s. Raises what entering raises; if `resp.prepared` by then, the caller must
    answer in-band."""
    pinger = _Pinger(request, resp, call.name, start, ping)
    try:
        return await call.__aenter__()
    finally:
        await pinger.stop()


async def stream_sse(request: web.Request, call: Call, *,
                     finished: Callable[[bytes], bool] = ended_well,
                     error_event: Callable[[str], bytes] = sse_codec.error_event_openai,
                     transform: Callable[[bytes], bytes] | None = None,
                     ) -> web.StreamResponse:
    """`relay_sse` for a call not entered yet: enter it with keep-alive comments while the
    lease waits, relay, close it."""
    resp = web.StreamResponse(status=200, headers=_SSE_HEADERS)
    try:
        await open_call(request, resp, call)
    except RouterdError as e:
        if not resp.prepared:
            raise
        note(request, error=e.message)
        await resp.write(error_event(e.message))
        await resp.write_eof()
        return resp
    try:
        return await relay_sse(request, call, finished=finished, error_event=error_event,
                               resp=resp, transform=transform)
    finally:
        await call.__aexit__(None, None, None)


async def relay_sse(request: web.Request, call: Call, *,
                    finished: Callable[[bytes], bool] = ended_well,
                    error_event: Callable[[str], bytes] = sse_codec.error_event_openai,
                    resp: web.StreamResponse | None = None,
                    transform: Callable[[bytes], bytes] | None = None) -> web.StreamResponse:
    """Same dialect: relay the engine's SSE bytes untouched; check the stream ended with its
    dialect's last event (`finished`: `[DONE]`, or `"stop": true` on llama.cpp's native
    stream), else end it with `error_event`. `resp`: a stream already started (keep-alives
    went out while the call was entered). `transform`: bytes -> bytes on the way (a rename)."""
    if resp is None:
        resp = web.StreamResponse(status=call.response.status, headers=_SSE_HEADERS)
    if not resp.prepared:
        resp.set_status(call.response.status)
        await resp.prepare(request)
    note_call(request, call)
    tail = stats = b""
    try:
        async for chunk in call.chunks():
            if transform is not None:
                chunk = transform(chunk)
                if not chunk:
                    continue
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


async def relay_body(call: Call, *, rename: str | None = None) -> web.Response:
    """Non-streaming same dialect: the engine's body, status and content type untouched
    (`rename`: but a JSON answer's `model` set to that name, the alias the client asked for)."""
    body = await call.read()
    ctype = call.response.headers.get("Content-Type", "application/json")
    if rename is not None and call.response.status == 200 and ctype.startswith(
            "application/json"):
        with contextlib.suppress(ValueError):
            body = json.dumps(sse_codec.renamed(json.loads(body), rename),
                              ensure_ascii=False, separators=(",", ":")).encode()
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
