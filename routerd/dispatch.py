"""Talking to a worker: the one home for sending a request to an engine.

A handler says what to send (`Dispatcher.call(name, path, body=...)`) and how to encode the
answer. This module leases a target from the placement (the scheduler), sends, retries once
before the first byte, counts progress, decides when a worker is hung, and says how a broken
answer ended. No handler knows how a worker fails.

A target is anything with a base URL and headers that answers HTTP: today a local `Runner`
(scheduler/), and a remote peer is one more kind of `Target` handed out by a `Placement`,
through this same call.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Any, AsyncIterator, Generic, Mapping, Protocol, TypeVar

import aiohttp
import structlog

from .errors import EngineRejected, RouterdError, UpstreamError, UpstreamUnavailable

log = structlog.get_logger(__name__)

# How an answer from an engine can break once it has started.
UPSTREAM_FAILURES = (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError,
                     asyncio.TimeoutError, asyncio.IncompleteReadError)


class Target(Protocol):
    """What a call talks to: one engine (a local worker, or a peer)."""

    @property
    def name(self) -> str: ...

    @property
    def base_url(self) -> str: ...

    @property
    def auth_headers(self) -> Mapping[str, str]: ...

    @property
    def alive(self) -> bool: ...

    def note_progress(self) -> None:
        """Output flowed from this target (liveness evidence for the prober)."""

    async def activity(self, session: aiohttp.ClientSession, timeout: float) -> bytes | None:
        """An opaque reading of the engine's work (llama-server's /slots); it changes while
        the engine makes progress on requests. None when the target has no such reading."""

    async def exit_code(self, wait: float) -> int | None:
        """How the target's process ended, waiting up to `wait` s; None if it runs on."""


T = TypeVar("T", bound=Target)


class Placement(Protocol[T]):
    """Hands out targets for a model name and takes them back (the scheduler)."""

    @property
    def closing(self) -> bool: ...

    async def acquire(self, name: str, *, keep_alive: float | None = None,
                      entry: Any = None) -> T: ...

    def release(self, target: T, keep_alive: float | None = None) -> None: ...

    async def kill_hung(self, target: T, reason: str) -> None: ...


class StreamBroken(Exception):
    """The engine's answer broke after it started (`cause` is the transport error)."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause) or type(cause).__name__)
        self.cause = cause


class Dispatcher(Generic[T]):
    """Sends requests to targets; one per app, holding the pooled client sessions."""

    def __init__(self, placement: Placement[T], pooled: aiohttp.ClientSession,
                 fresh: aiohttp.ClientSession, *, idle_timeout: float) -> None:
        self.placement = placement
        self.pooled, self.fresh = pooled, fresh
        # A stream that sends nothing for `idle_timeout` is hung. A non-streamed answer sends
        # nothing until it is done, however long that takes: its engine's liveness is the
        # prober's to judge (scheduler/supervision.py), not silence on the socket.
        self.stream_timeout = aiohttp.ClientTimeout(total=None, sock_connect=10,
                                                    sock_read=idle_timeout)
        self.answer_timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
        self.idle_timeout = idle_timeout

    async def watch(self, sent: Any, target: T) -> aiohttp.ClientResponse:
        """Wait for a non-streamed answer, which sends nothing until it is done. The engine is
        hung only when its own progress (`Target.activity`: /slots' tokens decoded and prompt
        tokens processed) stands still for `idle_timeout`; then the wait ends as a timeout
        (and the engine is killed). Silence alone is never a hang here."""
        task: asyncio.Future[aiohttp.ClientResponse] = asyncio.ensure_future(sent)
        every = max(0.05, min(self.idle_timeout / 4, 5.0))
        last: bytes | None = None  # no reading until the answer is late: none per request
        still_since = time.monotonic()
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=every)
                if done:
                    return task.result()
                now_reading = await target.activity(self.pooled, every)
                now = time.monotonic()
                if now_reading is not None and now_reading != last:
                    last, still_since = now_reading, now
                elif now - still_since >= self.idle_timeout:
                    raise asyncio.TimeoutError
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    def call(self, name: str, path: str, *, body: bytes | None,
             keep_alive: float | None = None, method: str = "POST", query: Any = None,
             content_type: str = "application/json", entry: Any = None,
             stream: bool = False) -> Call[T]:
        return Call(self, name, path, body, keep_alive, method, query, content_type, entry,
                    stream)


class Call(Generic[T]):
    """One request to one engine, used as `async with dispatcher.call(...) as call`.

    Entering leases a target for `name` and sends. A failure before the first byte
    (connection refused or reset, an SSE stream broken before its first chunk) is retried
    once, on a fresh connection, and on a fresh worker when the engine died; a timeout is not
    retried (the hung engine is killed). An engine error status becomes an UpstreamError
    (5xx) or an EngineRejected carrying its status (4xx). Leaving releases the response (a
    stream cut early closes the connection, so the engine stops generating) and the lease.

    A plain class rather than an asynccontextmanager: this runs on every proxied request,
    and the generator machinery was 6 % of routerd's CPU there."""

    __slots__ = ("_d", "name", "path", "body", "keep_alive", "method", "query",
                 "content_type", "entry", "_target", "resp", "waited", "started", "first",
                 "stream")

    def __init__(self, dispatcher: Dispatcher[T], name: str, path: str, body: bytes | None,
                 keep_alive: float | None, method: str, query: Any, content_type: str,
                 entry: Any, stream: bool) -> None:
        self._d, self.name, self.path, self.body = dispatcher, name, path, body
        self.keep_alive, self.method, self.query = keep_alive, method, query
        self.content_type, self.entry, self.stream = content_type, entry, stream
        self._target: T | None = None
        self.resp: aiohttp.ClientResponse | None = None
        self.waited = 0.0  # seconds spent waiting for the lease (queue + load)
        self.started = 0.0
        self.first = b""  # a stream's first chunk, read before answering (so failures retry)

    @property
    def load_ns(self) -> int:
        return int(self.waited * 1e9)

    def total_ns(self) -> int:
        return int((time.monotonic() - self.started) * 1e9)

    @property
    def target(self) -> T:
        assert self._target is not None, "the call has not been entered"
        return self._target

    @property
    def response(self) -> aiohttp.ClientResponse:
        assert self.resp is not None, "the call has not been entered"
        return self.resp

    async def __aenter__(self) -> Call[T]:
        d, placement, name = self._d, self._d.placement, self.name
        self.started = started = time.monotonic()
        for attempt in (1, 2):
            target = await placement.acquire(name, keep_alive=self.keep_alive, entry=self.entry)
            resp: aiohttp.ClientResponse | None = None
            try:
                self.waited = time.monotonic() - started
                headers = dict(target.auth_headers)
                url, body = target.base_url + self.path, self.body
                forward = getattr(target, "forward", None)  # a peer (routerd/peers/router.py)
                if forward is not None:
                    url, body = forward(self.path, body)
                if self.body is not None:
                    headers["Content-Type"] = self.content_type
                first = b""
                # The engine may close a pooled keep-alive connection just as it is reused
                # (llama-server's HTTP library caps requests per connection): the retry goes
                # on a new connection.
                session = d.pooled if attempt == 1 else d.fresh
                try:
                    sent = session.request(
                        self.method, url, data=body,
                        headers=headers, params=self.query,
                        timeout=d.stream_timeout if self.stream else d.answer_timeout)
                    resp = await (sent if self.stream else d.watch(sent, target))
                    if resp.status < 400 and resp.content_type == "text/event-stream":
                        # llama-server closes the connection after every streamed answer
                        # while advertising keep-alive: never put this one back in the pool.
                        if resp.connection is not None and resp.connection.protocol is not None:
                            resp.connection.protocol.force_close()
                        # Nothing has reached the client yet: a stream broken now is retried.
                        first = await resp.content.readany()
                        if not first:
                            raise aiohttp.ClientPayloadError("engine ended the stream at once")
                except asyncio.TimeoutError:  # before ClientConnectionError: both, for aiohttp
                    await placement.kill_hung(target, f"no answer within {d.idle_timeout:g}s")
                    raise UpstreamError(f"engine for {name!r} did not answer in time") from None
                except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as e:
                    if attempt == 2:
                        raise UpstreamError(f"engine for {name!r} failed: {e}") from None
                    code = await target.exit_code(0.1)  # a dying engine: ms
                    log.warning("request.retry", model=name, error=str(e) or type(e).__name__,
                                engine_exited=code is not None)
                    await _close(resp)
                    placement.release(target, self.keep_alive)
                    continue
                if resp.status >= 400:
                    raise await engine_error(resp, name)
            except BaseException:
                await _close(resp)
                placement.release(target, self.keep_alive)
                raise
            self._target, self.resp, self.first = target, resp, first
            return self
        raise AssertionError("unreachable")  # the second attempt returns or raises

    async def __aexit__(self, *exc: object) -> None:
        try:
            await _close(self.resp)
        finally:
            if self._target is not None:
                self._d.placement.release(self._target, self.keep_alive)

    # ------------------------------------------------------------------ reading the answer

    async def chunks(self) -> AsyncIterator[bytes]:
        """The answer's bytes as they come (the first chunk included); each one counts as
        progress. A transport failure raises StreamBroken."""
        target = self.target
        if self.first:
            yield self.first
        try:
            async for chunk in self.response.content.iter_any():
                target.note_progress()
                yield chunk
        except UPSTREAM_FAILURES as e:
            raise StreamBroken(e) from e

    async def read(self) -> bytes:
        """A non-streamed answer, whole."""
        try:
            return self.first + await self.response.read()
        except UPSTREAM_FAILURES as e:
            raise UpstreamError(
                f"engine failed while answering: {e or type(e).__name__}") from None

    async def json(self) -> Any:
        raw = await self.read()
        try:
            return json.loads(raw)
        except ValueError as e:
            raise UpstreamError(f"engine for {self.name!r} answered invalid JSON: {e}") from None

    async def broken(self, error: StreamBroken) -> str:
        """Why a started answer broke, for the in-band error; a hung engine is killed."""
        if isinstance(error.cause, asyncio.TimeoutError):
            await self._d.placement.kill_hung(
                self.target, "a request saw no output within the idle timeout")
            return "engine stopped producing output (timed out); the worker was restarted"
        if self._d.placement.closing:
            return "routerd is shutting down: the stream was cut at the drain deadline"
        reason = await self.ended_early()
        return f"{reason}: {error}" if str(error) else reason

    async def ended_early(self) -> str:
        """The answer ended without its last event: say how the engine ended."""
        code = await self.target.exit_code(0.5)  # a dying engine is reaped within ms
        return ("engine stream ended before completion"
                + (f" (engine exited with code {code})" if code is not None else ""))


async def _close(resp: aiohttp.ClientResponse | None) -> None:
    """What leaving `async with session.request(...)` does: give the connection back (or
    close it when the body was not read to its end) and wait until it is closed."""
    if resp is not None:
        resp.release()
        await resp.wait_for_close()


async def engine_error(resp: aiohttp.ClientResponse, name: str) -> RouterdError:
    """An engine's error status as routerd's error: its 5xx is an UpstreamError; its 4xx
    (e.g. a prompt longer than the context) passes through with its status and message."""
    text = (await resp.text(errors="replace"))[:2000]
    message = text
    with contextlib.suppress(ValueError, AttributeError, TypeError):
        data = json.loads(text)
        err = data.get("error", data)
        message = err.get("message", text) if isinstance(err, dict) else str(err)
    if resp.status in (429, 503):  # busy or loading (a peer's queue, llama-server loading)
        after = resp.headers.get("Retry-After", "")
        return UpstreamUnavailable(f"engine busy for {name!r}: {message}",
                                   retry_after=int(after) if after.isdigit() else 1)
    if resp.status >= 500:
        return UpstreamError(f"engine error for {name!r}: {message}")
    return EngineRejected(message, status=resp.status)
