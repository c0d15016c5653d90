"""Shared request plumbing: body parsing, dialect-aware error rendering, the engine call."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import aiohttp
import structlog
from aiohttp import web

from .. import keys
from ..config import ConfigError, parse_duration
from ..errors import BadRequest, RouterdError, UpstreamError

log = structlog.get_logger(__name__)

_compact = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
# Ollama and OpenAI both answer compact JSON.
jresp = functools.partial(web.json_response, dumps=_compact)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
OPENAI_PREFIXES = ("/v1/", "/completion", "/tokenize", "/detokenize", "/props", "/health",
                   "/upstream/", "/slots", "/embedding")


def dialect(path: str) -> str:
    return "openai" if path.startswith(OPENAI_PREFIXES) else "ollama"


def error_body(kind: str, err: RouterdError) -> dict[str, Any]:
    if kind == "openai":
        return {"error": {"message": err.message, "type": err.type, "code": err.code}}
    return {"error": err.message}


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except RouterdError as e:
        if e.status >= 500:
            log.warning("request.failed", path=request.path, status=e.status, error=e.message)
        return jresp(error_body(dialect(request.path), e), status=e.status,
                                 headers=e.headers)
    except web.HTTPRequestEntityTooLarge as e:
        err = RouterdError(f"request body too large ({e.text})")
        err.status, err.code = 413, "payload_too_large"
        return jresp(error_body(dialect(request.path), err), status=413)
    except (web.HTTPNotFound, web.HTTPMethodNotAllowed) as e:
        err = RouterdError(f"{e.reason}: {request.method} {request.path}")
        err.status, err.code, err.type = e.status, "not_found", "invalid_request_error"
        if e.status == 405:
            err.code = "method_not_allowed"
        return jresp(error_body(dialect(request.path), err), status=e.status,
                     headers={k: v for k, v in e.headers.items() if k == "Allow"})


async def read_json(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    if not raw:
        raise BadRequest("missing request body")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(f"invalid JSON in request body: {e}") from None
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    return body


def model_field(body: dict[str, Any], *, default: str | None = None) -> str:
    model = body.get("model", default)
    if model is None or model == "":
        if default:
            return default
        raise BadRequest("model is required")
    if not isinstance(model, str):
        raise BadRequest("model must be a string")
    return model


def keep_alive_field(body: dict[str, Any]) -> float | None:
    if "keep_alive" not in body or body["keep_alive"] is None:
        return None
    try:
        return parse_duration(body["keep_alive"], "keep_alive")
    except ConfigError as e:
        raise BadRequest(str(e).replace("config error: ", "")) from None


@dataclass
class EngineCall:
    runner: Any
    resp: aiohttp.ClientResponse
    waited: float  # seconds spent waiting for the lease (queue + load)
    started: float
    first: bytes = b""  # a stream's first chunk, read before answering (so failures retry)

    @property
    def load_ns(self) -> int:
        return int(self.waited * 1e9)

    def total_ns(self) -> int:
        return int((time.monotonic() - self.started) * 1e9)


class engine_call:  # noqa: N801 - used as `async with engine_call(...) as call`
    """Lease a worker for `name` and send it one request. A failure before the first byte
    (connection refused or reset, an SSE stream broken before its first chunk) is retried
    once, on a fresh worker when the engine died; a timeout is not retried (the hung engine
    is killed). An engine error status becomes an UpstreamError (5xx) or passes its status
    through (4xx).

    A plain class rather than an asynccontextmanager over an AsyncExitStack: this runs on
    every proxied request, and the generator machinery was 6 % of routerd's CPU there.
    Leaving the block releases the response (a stream cut early closes the connection, so
    the engine stops generating) and then the lease."""

    __slots__ = ("request", "name", "path", "body", "keep_alive", "method", "query",
                 "content_type", "entry", "_runner", "_resp")

    def __init__(self, request: web.Request, name: str, path: str, *, body: bytes | None,
                 keep_alive: float | None = None, method: str = "POST", query: Any = None,
                 content_type: str = "application/json", entry: Any = None) -> None:
        self.request, self.name, self.path, self.body = request, name, path, body
        self.keep_alive, self.method, self.query = keep_alive, method, query
        self.content_type, self.entry = content_type, entry
        self._runner: Any = None
        self._resp: aiohttp.ClientResponse | None = None

    async def __aenter__(self) -> EngineCall:
        app = self.request.app
        scheduler = app[keys.SCHEDULER]
        name = self.name
        idle = app[keys.CONFIG].timeouts.request_idle
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=idle)
        started = time.monotonic()
        for attempt in (1, 2):
            runner = await scheduler.acquire(name, keep_alive=self.keep_alive, entry=self.entry)
            resp: aiohttp.ClientResponse | None = None
            try:
                waited = time.monotonic() - started
                worker = runner.worker
                headers = dict(worker.auth_headers)
                if self.body is not None:
                    headers["Content-Type"] = self.content_type
                first = b""
                # The engine may close a pooled keep-alive connection just as it is reused
                # (llama-server's HTTP library caps requests per connection): the retry goes
                # on a new connection.
                session = app[keys.HTTP] if attempt == 1 else app[keys.HTTP_FRESH]
                try:
                    resp = await session.request(
                        self.method, worker.base_url + self.path, data=self.body,
                        headers=headers, params=self.query, timeout=timeout)
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
                    await scheduler.kill_hung(runner, f"no answer within {idle:g}s")
                    raise UpstreamError(f"engine for {name!r} did not answer in time") from None
                except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as e:
                    if attempt == 2:
                        raise UpstreamError(f"engine for {name!r} failed: {e}") from None
                    with contextlib.suppress(asyncio.TimeoutError):  # a dying engine: ms
                        await asyncio.wait_for(worker.exited(), 0.1)
                    log.warning("request.retry", model=name, error=str(e) or type(e).__name__,
                                engine_exited=not worker.alive)
                    await _close(resp)
                    scheduler.release(runner, self.keep_alive)
                    continue
                if resp.status >= 400:
                    raise await _engine_error(resp, name)
            except BaseException:
                await _close(resp)
                scheduler.release(runner, self.keep_alive)
                raise
            self._runner, self._resp = runner, resp
            return EngineCall(runner, resp, waited, started, first)
        raise AssertionError("unreachable")  # the second attempt returns or raises

    async def __aexit__(self, *exc: object) -> None:
        try:
            await _close(self._resp)
        finally:
            self.request.app[keys.SCHEDULER].release(self._runner, self.keep_alive)


async def _close(resp: aiohttp.ClientResponse | None) -> None:
    """What leaving `async with session.request(...)` does: give the connection back (or
    close it when the body was not read to its end) and wait until it is closed."""
    if resp is not None:
        resp.release()
        await resp.wait_for_close()


async def _engine_error(resp: aiohttp.ClientResponse, name: str) -> RouterdError:
    text = (await resp.text(errors="replace"))[:2000]
    message = text
    with contextlib.suppress(ValueError, AttributeError, TypeError):
        data = json.loads(text)
        err = data.get("error", data)
        message = err.get("message", text) if isinstance(err, dict) else str(err)
    if resp.status >= 500:
        return UpstreamError(f"engine error for {name!r}: {message}")
    e = BadRequest(message)  # the engine's 4xx (e.g. prompt longer than the context) passes
    e.status = resp.status
    return e


def note_request(request: web.Request, model: str) -> None:
    """Let the security layer check a key's model list and metrics label the request."""
    request[MODEL_NAME] = model
    checker = request.app.get(MODEL_CHECK)
    if checker is not None:
        checker(request, model)


MODEL_NAME = web.RequestKey("model", str)  # the model a request named (metrics, auth)
MODEL_CHECK: web.AppKey[Callable[[web.Request, str], None]] = web.AppKey("model_check")
