"""Anthropic Messages: POST /v1/messages and /v1/messages/count_tokens.

Served over the engine's chat completions for every engine (api/chatbridge.py): llama-server's
own /v1/messages is itself a conversion to its chat completions, and it neither enforces
`tool_choice` nor answers with the model name the client asked for; one path keeps both
engines alike. The routes declare the "anthropic" dialect, so every error (a full queue
included, which stays 503 with Retry-After rather than Anthropic's 529) is rendered as
`{"type": "error", "error": {"type", "message"}}`.
"""

from __future__ import annotations

from aiohttp import web

from . import chatbridge
from .common import add_route, jresp, model_field, note_request, read_json
from .translate import anthropic as tx


async def messages(request: web.Request) -> web.StreamResponse:
    body = await read_json(request)
    name = model_field(body)
    note_request(request, name)
    chat = tx.messages_request(body)
    keep_alive = chatbridge.keep_alive(body)
    if chat["stream"]:
        return await chatbridge.chat_stream(request, name, chat, tx.MessageStream(name),
                                            keep_alive=keep_alive)
    reply = await chatbridge.chat_reply(request, name, chat, keep_alive=keep_alive)
    return jresp(tx.message_response(reply, name))


async def count_tokens(request: web.Request) -> web.StreamResponse:
    body = await read_json(request)
    name = model_field(body)
    note_request(request, name)
    n = await chatbridge.count_tokens(request, name, tx.count_request(body))
    return jresp({"input_tokens": n})


def add_routes(app: web.Application) -> None:
    add_route(app, "POST", "/v1/messages", messages, dialect="anthropic", inference=True)
    add_route(app, "POST", "/v1/messages/count_tokens", count_tokens, dialect="anthropic")
