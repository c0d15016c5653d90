"""Rerank: POST /v1/rerank (aliases /rerank, /v1/reranking), Jina / Cohere shape, relayed to
the engine's /v1/rerank (llama-server started with --reranking for a model whose GGUF has
rank pooling or whose config says `rerank: true`). routerd's llama-cpp-python worker has no
rerank route: it answers 404/501, which passes through in OpenAI's error shape."""

from __future__ import annotations

import json

from aiohttp import web

from .common import add_route, engine_call, jresp, keep_alive_field, model_field, note_request
from .common import read_json
from .translate import rerank as tx


async def rerank(request: web.Request) -> web.Response:
    body = await read_json(request)
    name = model_field(body)
    note_request(request, name)
    payload, docs, return_documents = tx.rerank_request(body)
    payload["model"] = name
    async with engine_call(request, name, "/v1/rerank", body=json.dumps(payload).encode(),
                           keep_alive=keep_alive_field(body)) as call:
        reply = await call.json()
    return jresp(tx.rerank_response(reply, name, docs, return_documents, payload.get("top_n")))


def add_routes(app: web.Application) -> None:
    for path in ("/v1/rerank", "/rerank", "/v1/reranking"):
        add_route(app, "POST", path, rerank, dialect="openai", inference=True)
