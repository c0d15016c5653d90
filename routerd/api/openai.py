"""OpenAI dialect: /v1/chat/completions, /v1/completions, /v1/embeddings, /v1/models.

The engines speak this dialect already: bodies go through with unknown fields intact and the
answer's bytes are relayed untouched (no per-chunk JSON parsing).
"""

from __future__ import annotations

import json

from aiohttp import web

from .. import keys
from ..bodies import parse_object, stream_flag
from ..scheduler.accounting import read_info
from . import capabilities, chatbridge, peer_views
from .translate.schema import bound_body, string_bound
from .translate.sse import ModelRenamer
from .security import model_visible
from .common import add_route, engine_call, keep_alive_field, model_field, note_request, jresp
from .streaming import relay_body, stream_sse


async def _proxy(request: web.Request, path: str, raw: bytes | None = None,
                 body: dict | None = None) -> web.StreamResponse:
    if raw is None or body is None:
        raw = await request.read()
        body = parse_object(raw)  # validated here; the raw bytes are what we send
    name = model_field(body)
    note_request(request, name)
    stream = stream_flag(body, default=False)
    call = engine_call(request, name, path, body=raw, stream=stream,
                       keep_alive=keep_alive_field(body))
    # An alias: the answer names the model the client asked for (llama-server's completions
    # answer with the engine's own name; chat and embeddings echo the body's)
    alias = name if request.app[keys.CATALOG].resolve(name).name != name else None
    if stream:  # keep-alive comments while the lease waits (a cold load)
        return await stream_sse(request, call,
                                transform=ModelRenamer(alias).feed if alias else None)
    async with call:
        return await relay_body(call, rename=alias)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    raw = await request.read()
    body = parse_object(raw)
    name = model_field(body)
    if chatbridge.needs_bridge(request, name, body):  # a forced tool call, or an alias
        note_request(request, name)
        stream_flag(body, default=False)
        return await chatbridge.openai_chat(request, name, body)
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        # free strings bounded, so the JSON always closes inside a slot (translate/schema.py)
        launch = request.app[keys.CATALOG].resolve(name).launch
        body = bound_body(dict(body), string_bound(launch.ctx_size, launch.parallel))
        raw = json.dumps(body, ensure_ascii=False).encode()
    return await _proxy(request, "/v1/chat/completions", raw, body)


async def completions(request: web.Request) -> web.StreamResponse:
    return await _proxy(request, "/v1/completions")


async def embeddings(request: web.Request) -> web.StreamResponse:
    return await _proxy(request, "/v1/embeddings")


async def models(request: web.Request) -> web.Response:
    data = []
    for e in request.app[keys.CATALOG].entries():
        if e.replica_of or not model_visible(request, e.name):
            continue
        created = int(e.modified_at.timestamp()) if e.modified_at else 0
        data.append({"id": e.name, "object": "model", "created": created,
                     "owned_by": "routerd", "routerd": {"source": e.source,
                                                         "aliases": list(e.aliases)}})
    data.extend(peer_views.openai_models(request))  # marked with their peer
    return jresp({"object": "list", "data": data})


async def model(request: web.Request) -> web.Response:
    """GET /v1/models/{id}: one model, with what it can do (api/capabilities.py)."""
    name = request.match_info["id"]
    note_request(request, name)
    e = request.app[keys.CATALOG].resolve(name)
    info = read_info(e.launch.path) if e.launch.path else None
    created = int(e.modified_at.timestamp()) if e.modified_at else 0
    return jresp({"id": name, "object": "model", "created": created, "owned_by": "routerd",
                  "capabilities": capabilities.of(e, info),
                  "routerd": {"name": e.name, "source": e.source, "aliases": list(e.aliases),
                              "context_length": e.launch.ctx_size}})


def add_routes(app: web.Application) -> None:
    for method, path, handler in (("POST", "/v1/chat/completions", chat_completions),
                                  ("POST", "/v1/completions", completions),
                                  ("POST", "/v1/embeddings", embeddings)):
        add_route(app, method, path, handler, dialect="openai", inference=True)
    add_route(app, "GET", "/v1/models", models, dialect="openai")
    add_route(app, "GET", "/v1/models/{id:.+}", model, dialect="openai")
