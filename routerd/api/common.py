"""Shared request plumbing: routes with their dialect, dialect-aware error rendering, body
fields. Talking to a worker lives in routerd/dispatch.py."""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

import structlog
from aiohttp import web

from .. import keys
from ..bodies import parse_object
from ..config import ConfigError, parse_duration
from ..dispatch import Call
from ..errors import BadRequest, MethodNotAllowed, NotFound, PayloadTooLarge, RouterdError

log = structlog.get_logger(__name__)

_compact = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
# Ollama and OpenAI both answer compact JSON.
jresp = functools.partial(web.json_response, dumps=_compact)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


# ---------------------------------------------------------------- routes and their dialect

@dataclass
class Dialects:
    """Which dialect each route speaks (its errors are rendered in it) and whether it needs
    an admin key, declared where the route is registered. A request that matched no route
    (404, 405) takes the dialect of a route with the same path, else of routes under the same
    first path segment."""

    by_resource: dict[web.AbstractResource, str] = field(default_factory=dict)
    by_path: dict[str, str] = field(default_factory=dict)
    by_prefix: dict[str, str] = field(default_factory=dict)
    admin: set[tuple[web.AbstractResource, str]] = field(default_factory=set)
    inference: set[web.AbstractResource] = field(default_factory=set)

    def of(self, request: web.Request) -> str:
        resource = _resource(request)
        if resource is not None:
            found = self.by_resource.get(resource)
            if found is not None:
                return found
        path = request.path
        return self.by_path.get(path) or self.by_prefix.get(_first_segment(path), "ollama")

    def admin_only(self, request: web.Request) -> bool:
        """By resource and method: GET /lora-adapters is anyone's, POST is an admin's."""
        resource = _resource(request)
        method = "GET" if request.method == "HEAD" else request.method
        return (resource, method) in self.admin or (resource, "*") in self.admin

    def is_inference(self, request: web.Request) -> bool:
        return _resource(request) in self.inference


def _resource(request: web.Request) -> web.AbstractResource | None:
    route = request.match_info.route
    return route.resource if route is not None else None


def _first_segment(path: str) -> str:
    return "/" + path.lstrip("/").split("/", 1)[0]


DIALECTS = web.AppKey("dialects", Dialects)


def routes(app: web.Application) -> Dialects:
    dialects = app.get(DIALECTS)
    if dialects is None:
        dialects = app[DIALECTS] = Dialects()
    return dialects


def add_route(app: web.Application, method: str, path: str, handler: Handler, *,
              dialect: str, admin: bool = False, inference: bool = False) -> None:
    """Register a route, the dialect its errors are rendered in, whether it needs an admin
    key (it changes what others get: pulls, deletes, engine state) and whether it runs a
    model (per-key concurrency limits count it)."""
    if method == "GET":  # and HEAD, as aiohttp's add_get does
        route = app.router.add_get(path, handler)
    else:
        route = app.router.add_route(method, path, handler)
    table = routes(app)
    resource = route.resource
    assert resource is not None
    table.by_resource[resource] = dialect
    if admin:
        table.admin.add((resource, method))
    if inference:
        table.inference.add(resource)
    if "{" not in path:
        table.by_path.setdefault(path, dialect)
    table.by_prefix.setdefault(_first_segment(path), dialect)


def error_body(kind: str, err: RouterdError) -> dict[str, Any]:
    if kind == "openai":
        return {"error": {"message": err.message, "type": err.type, "code": err.code}}
    if kind == "anthropic":
        from .translate.anthropic import error_object, error_type

        return error_object(error_type(err.status), err.message)
    return {"error": err.message}


def _as_error(request: web.Request, e: web.HTTPException) -> RouterdError | None:
    if isinstance(e, web.HTTPRequestEntityTooLarge):
        return PayloadTooLarge(f"request body too large ({e.text})")
    if isinstance(e, web.HTTPMethodNotAllowed):
        return MethodNotAllowed(f"{e.reason}: {request.method} {request.path}",
                                allow=e.headers.get("Allow", ""))
    if isinstance(e, web.HTTPNotFound):
        return NotFound(f"{e.reason}: {request.method} {request.path}")
    return None


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except RouterdError as e:
        err = e
    except (web.HTTPRequestEntityTooLarge, web.HTTPNotFound, web.HTTPMethodNotAllowed) as e:
        converted = _as_error(request, e)
        assert converted is not None
        err = converted
    if err.status >= 500:
        log.warning("request.failed", path=request.path, status=err.status, error=err.message)
    dialects = request.app.get(DIALECTS) or Dialects()
    return jresp(error_body(dialects.of(request), err), status=err.status, headers=err.headers)


# ---------------------------------------------------------------- bodies and fields

async def read_json(request: web.Request, *, required: bool = True) -> dict[str, Any]:
    return parse_object(await request.read() if request.body_exists else b"",
                        required=required)


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
        raise BadRequest(f"keep_alive: {e.reason}") from None


def note_request(request: web.Request, model: str) -> None:
    """Let the security layer check a key's model list and metrics label the request."""
    request[MODEL_NAME] = model
    checker = request.app.get(MODEL_CHECK)
    if checker is not None:
        checker(request, model)


def check_keep_alive(request: web.Request, keep_alive: float | None) -> None:
    """keep_alive 0 unloads a model others may be using, -1 pins it: each needs the key's
    permission (api/security.py roles)."""
    if keep_alive == 0:
        request.app[PERMISSION_CHECK](request, "unload")
    elif keep_alive is not None and math.isinf(keep_alive):
        request.app[PERMISSION_CHECK](request, "pin")


def engine_call(request: web.Request, name: str, path: str, *, body: bytes | None,
                keep_alive: float | None = None, method: str = "POST", query: Any = None,
                content_type: str = "application/json", entry: Any = None,
                stream: bool = False) -> Call[Any]:
    """`async with engine_call(request, ...) as call`: the app's dispatcher, for a handler.
    `stream` says whether the answer streams (a non-streamed answer sends nothing until it is
    done, so only a stream can be judged hung by silence)."""
    check_keep_alive(request, keep_alive)
    return request.app[keys.DISPATCHER].call(
        name, path, body=body, keep_alive=keep_alive, method=method, query=query,
        content_type=content_type, entry=entry, stream=stream)


MODEL_NAME = web.RequestKey("model", str)  # the model a request named (metrics, auth)
MODEL_CHECK: web.AppKey[Callable[[web.Request, str], None]] = web.AppKey("model_check")
# (request, "pin" | "unload" | "load_options") -> None, or Forbidden (api/security.py)
PERMISSION_CHECK: web.AppKey[Callable[[web.Request, str], None]] = web.AppKey("permission_check")
