"""llama.cpp native routes and the /upstream/<model>/<path> pass-through.

The body's (or query's) `model` picks the worker, else `default_model`; the engine's bytes are
relayed untouched.
"""

from __future__ import annotations

from aiohttp import web

from .. import keys
from ..bodies import parse_object
from ..errors import BadRequest
from .common import add_route, engine_call, keep_alive_field, model_field, note_request, jresp
from .security import upstream_path
from .streaming import ended_well, relay_body, relay_sse, stream_sse
from .translate import sse as sse_codec


def _default(request: web.Request) -> str | None:
    return request.query.get("model") or request.app[keys.CONFIG].default_model


async def _native(request: web.Request, path: str) -> web.StreamResponse:
    raw = await request.read() if request.body_exists else b""
    body = parse_object(raw, required=False)
    name = model_field(body, default=_default(request))
    note_request(request, name)
    stream = body.get("stream", False) is True
    method = request.method if request.method in ("GET", "POST") else "POST"
    call = engine_call(request, name, path, body=raw or None, method=method,
                       keep_alive=keep_alive_field(body), stream=stream)
    if stream:  # keep-alive comments while the lease waits (a cold load)
        return await stream_sse(request, call)
    async with call:
        return await relay_body(call)


async def completion(request: web.Request) -> web.StreamResponse:
    return await _native(request, "/completion")


async def tokenize(request: web.Request) -> web.StreamResponse:
    return await _native(request, "/tokenize")


async def detokenize(request: web.Request) -> web.StreamResponse:
    return await _native(request, "/detokenize")


async def props(request: web.Request) -> web.StreamResponse:
    return await _native(request, "/props")


async def infill(request: web.Request) -> web.StreamResponse:
    return await _native(request, "/infill")


async def apply_template(request: web.Request) -> web.StreamResponse:
    return await _native(request, "/apply-template")


async def embedding(request: web.Request) -> web.StreamResponse:
    return await _native(request, "/embedding")


async def embeddings_native(request: web.Request) -> web.StreamResponse:
    return await _native(request, "/embeddings")


async def slots(request: web.Request) -> web.StreamResponse:
    return await _native(request, "/slots")


async def lora_adapters(request: web.Request) -> web.StreamResponse:
    return await _native(request, "/lora-adapters")


async def slot_action(request: web.Request) -> web.StreamResponse:
    """POST /slots/{id}?action=save|restore|erase&model=NAME: changes the engine's state, so
    admin only (saved files land in the engine's --slot-save-path)."""
    action = request.query.get("action")
    if action not in ("save", "restore", "erase"):
        raise BadRequest('action must be "save", "restore" or "erase" (?action=...)')
    slot = request.match_info["id"]
    if not slot.isdigit():
        raise BadRequest("the slot id must be a number")
    raw = await request.read() if request.body_exists else b""
    body = parse_object(raw, required=False)
    name = model_field(body, default=_default(request))
    note_request(request, name)
    async with engine_call(request, name, f"/slots/{slot}", body=raw or b"{}",
                           query={"action": action}) as call:
        return await relay_body(call)


async def health(request: web.Request) -> web.Response:
    """routerd's own health: it is up. (A model's engine health is in /api/ps.)"""
    return jresp({"status": "ok"})


def _split_upstream(request: web.Request) -> tuple[str, str]:
    """`/upstream/<model>/<path>`: model names may hold `/` (hf/org/repo:q4), so the longest
    leading run of segments that names a known model wins."""
    parts = request.match_info["tail"].split("/")
    catalog = request.app[keys.CATALOG]
    for i in range(len(parts) - 1, 0, -1):
        name = "/".join(parts[:i])
        if catalog.get(name) is not None:
            return name, upstream_path("/".join(parts[i:]))
    return parts[0], upstream_path("/".join(parts[1:]))


async def upstream(request: web.Request) -> web.StreamResponse:
    name, path = _split_upstream(request)
    note_request(request, name)
    raw = await request.read() if request.body_exists else None
    ctype = request.headers.get("Content-Type", "application/json")
    async with engine_call(request, name, path, body=raw, method=request.method,
                           query=request.query, content_type=ctype) as call:
        if call.response.headers.get("Content-Type", "").startswith("text/event-stream"):
            # each dialect's own last event: Responses and Anthropic streams send no [DONE]
            finished = sse_codec.stream_finisher(path) or ended_well
            return await relay_sse(request, call, finished=finished)
        return await relay_body(call)


def add_routes(app: web.Application) -> None:
    for method, path, handler in (("POST", "/completion", completion),
                                  ("POST", "/completions", completion),
                                  ("POST", "/tokenize", tokenize),
                                  ("POST", "/detokenize", detokenize)):
        add_route(app, method, path, handler, dialect="openai", inference=True)
    for method, path, handler in (("POST", "/infill", infill),
                                  ("POST", "/apply-template", apply_template),
                                  ("POST", "/embedding", embedding),
                                  ("POST", "/embeddings", embeddings_native)):
        add_route(app, method, path, handler, dialect="openai", inference=True)
    add_route(app, "GET", "/slots", slots, dialect="openai")
    add_route(app, "GET", "/lora-adapters", lora_adapters, dialect="openai")
    # what changes an engine's state for everyone: admin keys only (README: Security)
    add_route(app, "POST", "/slots/{id}", slot_action, dialect="openai", admin=True)
    add_route(app, "POST", "/lora-adapters", lora_adapters, dialect="openai", admin=True)
    add_route(app, "GET", "/props", props, dialect="openai")
    add_route(app, "GET", "/health", health, dialect="openai")
    # The engine's whole surface, state-changing routes (LoRA scales, slots) included.
    add_route(app, "*", "/upstream/{tail:.+}", upstream, dialect="openai", admin=True)
