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
import re
from typing import Any, AsyncIterator

import structlog
from aiohttp import web

from .. import keys
from ..activity import published_pull
from ..bodies import stream_flag
from .common import add_route, read_json
from ..errors import BadRequest, ModelNotFound, RouterdError
from ..store import gguf
from ..store.blobs import receive_blob
from ..store.manifests import (CONFIG_V1, LICENSE, MESSAGES, MODEL, PARAMS, PROJECTOR, SYSTEM,
                               TEMPLATE, Layer, build_config, build_manifest, parse_manifest)
from ..store.names import ModelName, parse_digest, parse_name
from ..store.pull import Puller, progress
from ..store.store import Store

log = structlog.get_logger(__name__)

PULLER = web.AppKey("puller", Puller)
NDJSON = "application/x-ndjson"
_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode  # Ollama: compact
_PARAM_KEY = re.compile(r"^[a-z_][a-z0-9_]{0,63}$")


def add_routes(app: web.Application) -> None:
    for method, path, handler in (("POST", "/api/pull", pull), ("DELETE", "/api/delete", delete),
                                  ("POST", "/api/copy", copy),
                                  ("HEAD", "/api/blobs/{digest}", head_blob),
                                  ("POST", "/api/blobs/{digest}", post_blob),
                                  ("POST", "/api/create", create)):
        add_route(app, method, path, handler, dialect="ollama")


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


def _name_field(body: dict[str, Any], *fields: str) -> str:
    for f in fields:
        v = body.get(f)
        if isinstance(v, str) and v:
            return v
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
    name = _name_field(body, "model", "name")
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
    name = _name_field(body, "model", "name")
    store: Store = request.app[keys.STORE]
    await asyncio.to_thread(store.delete, name)
    _refresh_catalog(request)
    request.app[keys.EVENTS].publish("model.deleted", model=name)
    return web.Response(status=200)


async def copy(request: web.Request) -> web.Response:
    body = await read_json(request)
    src, dst = _name_field(body, "source"), _name_field(body, "destination")
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
    name = parse_name(_name_field(body, "model", "name"))
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


# ---------------------------------------------------------------- create


def build_model(store: Store, name: ModelName, body: dict[str, Any]) -> list[dict[str, Any]]:
    """Assemble and store a model (blocking; run in a thread); returns the status events."""
    events: list[dict[str, Any]] = []
    if body.get("files"):
        events.append(progress("parsing GGUF"))
        base, details = _layers_from_files(store, body["files"])
        params: dict[str, Any] = {}
    elif body.get("from"):
        base, details, params = _layers_from_model(store, body["from"])
    else:
        raise BadRequest("neither 'from' nor 'files' was specified")
    new = _new_layers(body, params)
    replaced = {media for media, _ in new}
    layers = [la for la in base if la.media_type not in replaced]
    with store.pinned(la.digest for la in base):
        for la in layers:
            events.append(progress(f"using existing layer {la.ref}"))
        for media, data in new:
            digest, created = store.add_blob(data)
            layers.append(Layer(media, digest, len(data)))
            events.append(progress(f"{'creating new' if created else 'using existing'} "
                                   f"layer sha256:{digest}"))
        cfg = build_config(details, layers)
        cfg_digest, _ = store.add_blob(cfg)
        events.append(progress("writing manifest"))
        store.write_manifest(name, build_manifest(Layer(CONFIG_V1, cfg_digest, len(cfg)), layers))
    events.append(progress("success"))
    log.info("store.created", model=name.display, layers=len(layers))
    return events


def _layers_from_files(store: Store, files: Any) -> tuple[list[Layer], dict[str, Any]]:
    if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
        raise BadRequest("files must map file names to sha256 digests")
    layers: list[Layer] = []
    details: dict[str, Any] = {}
    for fname, ref in files.items():
        digest = parse_digest(ref)
        if not str(fname).lower().endswith(".gguf"):
            raise BadRequest(f"{fname}: only GGUF files are supported")
        if not store.import_blob(digest):
            raise BadRequest(f"blob sha256:{digest} not found: upload it first "
                             f"(POST /api/blobs/sha256:{digest})")
        path = store.blob_path(digest)
        info = store.gguf_info(path)
        if info is None:
            raise BadRequest(f"{fname} is not a valid GGUF file")
        media = PROJECTOR if info.architecture == "clip" else MODEL
        if media == MODEL:
            if details:
                raise BadRequest("more than one model GGUF in files")
            details = gguf.details(info)
        layers.append(Layer(media, digest, path.stat().st_size))
    if not details:
        raise BadRequest("files holds no model GGUF")
    layers.sort(key=lambda la: la.media_type != MODEL)
    return layers, details


def _layers_from_model(store: Store, src: Any) -> tuple[list[Layer], dict[str, Any],
                                                        dict[str, Any]]:
    if not isinstance(src, str):
        raise BadRequest("from must be a model name")
    model = store.resolve(src)
    if model is None or model.manifest_path is None:
        raise ModelNotFound(f"model '{src}' not found")
    manifest = parse_manifest(model.manifest_path.read_bytes())
    for la in manifest.layers:
        if not store.import_blob(la.digest):
            raise ModelNotFound(f"model '{src}' is missing blob {la.ref}")
    return list(manifest.layers), dict(model.details), dict(model.params)


def _new_layers(body: dict[str, Any], params: dict[str, Any]) -> list[tuple[str, bytes]]:
    new: list[tuple[str, bytes]] = []
    for key, media in (("template", TEMPLATE), ("system", SYSTEM)):
        if key in body and body[key] is not None:
            if not isinstance(body[key], str):
                raise BadRequest(f"{key} must be a string")
            new.append((media, body[key].encode()))
    lic = body.get("license")
    if lic is not None:
        texts = [lic] if isinstance(lic, str) else lic
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise BadRequest("license must be a string or a list of strings")
        new.extend((LICENSE, t.encode()) for t in texts)
    if body.get("parameters") is not None:
        merged = {**params, **_check_parameters(body["parameters"])}
        new.append((PARAMS, json.dumps(merged).encode()))
    if body.get("messages") is not None:
        msgs = body["messages"]
        if not isinstance(msgs, list) or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str) for m in msgs):
            raise BadRequest("messages must be a list of {role, content}")
        new.append((MESSAGES, json.dumps([{"role": m["role"], "content": m["content"]}
                                          for m in msgs]).encode()))
    return new


def _check_parameters(raw: Any) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise BadRequest("parameters must be an object")
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if not isinstance(key, str) or not _PARAM_KEY.match(key):
            raise BadRequest(f"invalid parameter name {str(key)[:64]!r}")
        if key == "stop":
            value = [value] if isinstance(value, str) else value
            if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
                raise BadRequest("stop must be a string or a list of strings")
        elif isinstance(value, list):
            if not all(isinstance(v, (str, int, float, bool)) for v in value):
                raise BadRequest(f"parameter {key}: invalid value")
        elif value is not None and not isinstance(value, (str, int, float, bool)):
            raise BadRequest(f"parameter {key}: invalid value")
        out[key] = value
    return out
