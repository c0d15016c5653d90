"""Ollama's model-management routes: pull, delete, copy, blobs and create.

``POST /api/pull`` streams NDJSON progress exactly like Ollama (``stream: false`` answers
the last status, or the error with its HTTP status).  Name and host checks happen
before the stream starts (400/403 as JSON); a failure after that is written in-band as
``{"error": "..."}`` and the stream ends.  ``/api/create`` does its (fast) work before
answering, so its errors are always plain HTTP errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any, AsyncIterator

import structlog
from aiohttp import web

from .. import keys
from ..activity import published_pull
from ..bodies import stream_flag
from .common import add_route, read_json
from .security import check_model_allowed
from ..errors import BadRequest, RouterdError
from ..store.blobs import receive_blob
from ..store.names import parse_digest, parse_name
from ..store.create import build_model
from ..store.pull import Puller
from ..store.store import Store

log = structlog.get_logger(__name__)

PULLER = web.AppKey("puller", Puller)
NDJSON = "application/x-ndjson"
_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode  # Ollama: compact


def add_routes(app: web.Application) -> None:
    for method, path, handler in (("POST", "/api/pull", pull), ("DELETE", "/api/delete", delete),
                                  ("POST", "/api/copy", copy),
                                  ("HEAD", "/api/blobs/{digest}", head_blob),
                                  ("POST", "/api/blobs/{digest}", post_blob),
                                  ("POST", "/api/create", create)):
        add_route(app, method, path, handler, dialect="ollama", admin=True)


async def store_context(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx: the Store (models_dir + ollama_models_dir read-only) and the Puller."""
    config = app[keys.CONFIG]
    readonly = [config.expand(config.ollama_models_dir)] if config.ollama_models_dir else []
    readonly += [d for d in app.get(keys.OLLAMA_DIRS, []) if d not in readonly]
    store = Store(config.expand(config.models_dir), readonly)
    puller = Puller(store, allow_hosts=config.registries.allow,
                    insecure_default=config.registries.insecure)
    app[keys.STORE] = store
    app[PULLER] = puller
    try:
        yield
    finally:
        await puller.aclose()


# ---------------------------------------------------------------- helpers


def _name_field(request: web.Request, body: dict[str, Any], *fields: str) -> str:
    """The model a management request names, checked against the key's model list: a key
    limited to some models may not copy, overwrite, delete or pull any other."""
    for f in fields:
        v = body.get(f)
        if isinstance(v, str) and v:
            check_model_allowed(request, v)
            return v
        if v is not None and not isinstance(v, str):
            raise BadRequest(f"{f} must be a string")
    raise BadRequest(f"{fields[0]} is required")


async def stream_events(request: web.Request,
                        events: AsyncIterator[dict[str, Any]]) -> web.StreamResponse:
    """NDJSON out; a failure after the first byte is written in-band and ends the stream."""
    resp = web.StreamResponse(headers={"Content-Type": NDJSON})
    await resp.prepare(request)
    try:
        async with contextlib.aclosing(events) as it:  # type: ignore[type-var]
            async for event in it:
                await resp.write(_encode(event).encode() + b"\n")
    except (ConnectionResetError, ConnectionError):
        log.info("pull.client_left", path=request.path)
        return resp
    except RouterdError as e:
        await _write_error(resp, e.message)
    except Exception as e:  # an in-band error is the only way left to tell the client
        log.exception("api.stream_failed", path=request.path)
        await _write_error(resp, str(e) or type(e).__name__)
    with contextlib.suppress(ConnectionError):
        await resp.write_eof()
    return resp


async def _write_error(resp: web.StreamResponse, message: str) -> None:
    with contextlib.suppress(ConnectionError):
        await resp.write(_encode({"error": message}).encode() + b"\n")


def _refresh_catalog(request: web.Request) -> None:
    """Tell the catalog the store changed (it lists pulled models without a config entry)."""
    catalog = request.app.get(keys.CATALOG)
    if catalog is not None:
        catalog.refresh()


async def _refreshing(request: web.Request,
                      events: AsyncIterator[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
    async with contextlib.aclosing(events) as it:  # type: ignore[type-var]
        async for event in it:
            if event.get("status") == "success":  # servable before the client hears so
                _refresh_catalog(request)
            yield event


# ---------------------------------------------------------------- handlers


async def pull(request: web.Request) -> web.StreamResponse:
    body = await read_json(request)
    name = _name_field(request, body, "model", "name")
    insecure = body.get("insecure") is True
    puller = request.app[PULLER]
    puller.check(name, insecure)  # invalid name, http without insecure, host not allowed
    events = published_pull(request.app[keys.EVENTS], name,
                            _refreshing(request, puller.pull(name, insecure=insecure)))
    if stream_flag(body, default=True):
        return await stream_events(request, events)
    last: dict[str, Any] = {}
    async with contextlib.aclosing(events) as it:  # type: ignore[type-var]
        async for event in it:
            last = event
    return web.json_response(last, dumps=_encode)


async def delete(request: web.Request) -> web.Response:
    body = await read_json(request)
    name = _name_field(request, body, "model", "name")
    store: Store = request.app[keys.STORE]
    scheduler = request.app.get(keys.SCHEDULER)
    resolved = _loaded_name(request, name) if scheduler is not None else None
    await asyncio.to_thread(store.delete, name)
    _refresh_catalog(request)
    if scheduler is not None and resolved is not None:
        scheduler.forget_model(resolved)  # its engine stops once idle; the file unmaps
    request.app[keys.EVENTS].publish("model.deleted", model=name)
    return web.Response(status=200)


def _loaded_name(request: web.Request, name: str) -> str | None:
    try:
        return request.app[keys.CATALOG].resolve(name).name
    except RouterdError:
        return None


async def copy(request: web.Request) -> web.Response:
    body = await read_json(request)
    src = _name_field(request, body, "source")
    dst = _name_field(request, body, "destination")
    parse_name(dst)
    store: Store = request.app[keys.STORE]
    await asyncio.to_thread(store.copy, src, dst)
    _refresh_catalog(request)
    return web.Response(status=200)


async def head_blob(request: web.Request) -> web.Response:
    digest = parse_digest(request.match_info["digest"])
    store: Store = request.app[keys.STORE]
    found = await asyncio.to_thread(store.find_blob, digest)
    return web.Response(status=200 if found else 404)


async def post_blob(request: web.Request) -> web.Response:
    digest = parse_digest(request.match_info["digest"])
    store: Store = request.app[keys.STORE]
    created = await receive_blob(store.blobs_dir, digest, request.content.iter_chunked(1 << 20))
    log.info("store.blob_received", digest=digest[:12], created=created)
    return web.Response(status=201 if created else 200)


async def create(request: web.Request) -> web.StreamResponse:
    body = await read_json(request)
    name = parse_name(_name_field(request, body, "model", "name"))
    if body.get("from") is not None:
        _name_field(request, body, "from")  # building on a model reads it
    for unsupported in ("quantize", "adapters"):
        if body.get(unsupported):
            raise BadRequest(f"{unsupported} is not supported by routerd")
    store: Store = request.app[keys.STORE]
    events = await asyncio.to_thread(build_model, store, name, body)
    _refresh_catalog(request)
    if not stream_flag(body, default=True):
        return web.json_response(events[-1], dumps=_encode)

    async def replay() -> AsyncIterator[dict[str, Any]]:
        for e in events:
            yield e

    return await stream_events(request, replay())
