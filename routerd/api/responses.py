"""OpenAI Responses: POST /v1/responses, GET/DELETE /v1/responses/{id},
POST /v1/responses/input_tokens.

Served over the engine's chat completions for every engine (api/chatbridge.py); routerd itself
keeps the state (api/response_store.py, under `state_dir/responses/`), so
`previous_response_id` works on any engine and across a restart of routerd. llama-server's own
/v1/responses rejects `previous_response_id` and has no GET or DELETE.
"""

from __future__ import annotations

from typing import Any, AsyncIterator

from aiohttp import web

from .. import keys
from ..errors import BadRequest, RouterdError
from . import chatbridge
from .common import add_route, jresp, model_field, note_request, read_json
from .response_store import ResponseStore, Stored
from .translate import responses as tx

STORE: web.AppKey[ResponseStore] = web.AppKey("responses_store", ResponseStore)


class ResponseNotFound(RouterdError):
    status = 404
    code = "not_found"
    type = "invalid_request_error"


async def store_context(app: web.Application) -> AsyncIterator[None]:
    config = app[keys.CONFIG]
    app[STORE] = ResponseStore(config.expand(config.state_dir) / "responses")
    yield


def _stored(request: web.Request, rid: Any) -> Stored:
    found = request.app[STORE].get(rid) if isinstance(rid, str) else None
    if found is None:
        raise ResponseNotFound(f"Response with id '{rid}' not found.")
    return found


def _keep(request: web.Request, body: dict[str, Any], obj: dict[str, Any],
          convo: list[dict[str, Any]]) -> None:
    if body.get("store", True) is not False:
        request.app[STORE].put(obj, convo + tx.output_messages(obj["output"]))


async def create(request: web.Request) -> web.StreamResponse:
    body = await read_json(request)
    name = model_field(body)
    note_request(request, name)
    store = body.get("store", True)
    if not isinstance(store, bool):
        raise BadRequest("store: must be a boolean")
    history: list[dict[str, Any]] = []
    prev = body.get("previous_response_id")
    if prev is not None:
        history = _stored(request, prev).history
    convo = history + tx.input_messages(body)
    chat = tx.responses_request(body, convo)
    echo = tx.Echo(name, body)
    keep_alive = chatbridge.keep_alive(body)
    if chat["stream"]:
        stream = _StoringStream(echo, lambda obj: _keep(request, body, obj, convo))
        return await chatbridge.chat_stream(request, name, chat, stream, keep_alive=keep_alive)
    reply = await chatbridge.chat_reply(request, name, chat, keep_alive=keep_alive)
    obj = tx.response_object(reply, echo)
    _keep(request, body, obj, convo)
    return jresp(obj)


class _StoringStream(tx.ResponseStream):
    """Stores the completed response as the stream ends."""

    def __init__(self, echo: tx.Echo, keep: Any) -> None:
        super().__init__(echo)
        self._keep = keep

    def finish(self) -> bytes:
        out = super().finish()
        if self.response is not None:
            self._keep(self.response)
        return out


async def get(request: web.Request) -> web.Response:
    return jresp(_stored(request, request.match_info["id"]).response)


async def delete(request: web.Request) -> web.Response:
    rid = request.match_info["id"]
    if not request.app[STORE].delete(rid):
        raise ResponseNotFound(f"Response with id '{rid}' not found.")
    return jresp({"id": rid, "object": "response", "deleted": True})


async def input_tokens(request: web.Request) -> web.Response:
    body = await read_json(request)
    name = model_field(body)
    note_request(request, name)
    history: list[dict[str, Any]] = []
    if body.get("previous_response_id") is not None:
        history = _stored(request, body["previous_response_id"]).history
    chat = tx.responses_request(body, history + tx.input_messages(body))
    n = await chatbridge.count_tokens(request, name, chat)
    return jresp({"object": "response.input_tokens", "input_tokens": n})


ROUTES = (("POST", "/v1/responses", create),
          ("POST", "/v1/responses/input_tokens", input_tokens),
          ("GET", "/v1/responses/{id}", get),
          ("DELETE", "/v1/responses/{id}", delete))


def add_routes(app: web.Application) -> None:
    app.cleanup_ctx.append(store_context)
    for method, path, handler in ROUTES:
        add_route(app, method, path, handler, dialect="openai",
                  inference=method == "POST" and path == "/v1/responses")
