"""Ollama dialect inference routes: /api/generate, /api/chat, /api/embed, /api/embeddings.

The engines speak OpenAI; requests and answers go through the pure converters in translate/.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from .. import keys
from ..activity import note_usage
from ..catalog import with_load_options
from ..errors import BadRequest
from ..bodies import stream_flag
from ..scheduler.accounting import read_info
from . import capabilities, chatbridge
from .common import (PERMISSION_CHECK, add_route, check_keep_alive, engine_call,
                     keep_alive_field, jresp, model_field, note_request, read_json)
from .streaming import relay_translated
from .translate import ollama as tx
from .translate import ollama_response as rx
from .translate.ollama_stream import ChatStream, GenerateStream
from .translate.fields import get_bool
from .translate.schema import bound_body, string_bound
from .translate.sse import encode_ndjson

CHAT_PATH = "/v1/chat/completions"


def _entry(request: web.Request, name: str, body: dict[str, Any]) -> Any:
    """The model's catalog entry with this request's load options (num_ctx, num_gpu)."""
    entry = request.app[keys.CATALOG].resolve(name)
    chosen = with_load_options(entry, tx.load_options(body, entry.defaults))
    if chosen is not entry and chosen.launch.identity() != entry.launch.identity():
        request.app[PERMISSION_CHECK](request, "load_options")
    return chosen


async def _load_or_unload(request: web.Request, name: str, keep_alive: float | None,
                          *, chat: bool, body: dict[str, Any]) -> web.Response:
    """Nothing to generate: load the model (done_reason "load"), or with keep_alive 0
    unload it ("unload"), as Ollama does."""
    scheduler = request.app[keys.SCHEDULER]
    entry = _entry(request, name, body)
    check_keep_alive(request, keep_alive)
    if entry.launch.backend == "peer":  # another host's model: it loads there on demand
        return jresp(rx.load_response(name, chat=chat,
                                      done_reason="unload" if keep_alive == 0 else "load"))
    if keep_alive == 0:
        await scheduler.unload(entry.name)
        return jresp(rx.load_response(name, chat=chat, done_reason="unload"))
    await scheduler.load(entry.name, keep_alive=keep_alive, entry=entry)
    return jresp(rx.load_response(name, chat=chat, done_reason="load"))


def _counted(request: web.Request, out: dict[str, Any]) -> web.Response:
    note_usage(request, out)
    metrics = request.app.get(keys.METRICS)
    if metrics is not None:
        metrics.add_tokens(out["model"], out.get("prompt_eval_count", 0),
                           out.get("eval_count", 0))
    return jresp(out)


async def chat(request: web.Request) -> web.StreamResponse:
    body = await read_json(request)
    messages = body.get("messages")
    if messages is not None and not isinstance(messages, list):
        raise BadRequest("messages must be a list")
    return await _infer(request, body, chat=True, empty=not messages)


async def generate(request: web.Request) -> web.StreamResponse:
    body = await read_json(request)
    prompt = body.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise BadRequest("prompt must be a string")
    return await _infer(request, body, chat=False, empty=not prompt and not body.get("suffix"))


async def _infer(request: web.Request, body: dict[str, Any], *, chat: bool,
                 empty: bool) -> web.StreamResponse:
    """/api/chat and /api/generate: translate, lease, relay (streamed or folded)."""
    name = model_field(body)
    note_request(request, name)
    keep_alive = keep_alive_field(body)
    stream = stream_flag(body, default=True)
    if empty:
        return await _load_or_unload(request, name, keep_alive, chat=chat, body=body)
    entry = _entry(request, name, body)
    if body.get("tools") or body.get("think"):  # Ollama's 400 for what the model lacks
        info = read_info(entry.launch.path) if entry.launch.path else None
        if capabilities.template_of(entry, info):  # unknown template: let the engine decide
            capabilities.check_ollama_chat(name, capabilities.of(entry, info), body)
    if chat:
        path, payload = CHAT_PATH, tx.chat_request(body, entry.defaults)
    else:
        path, payload = tx.generate_request(body, entry.defaults)
    payload["model"] = entry.name
    # free strings bounded, so `format` JSON always closes inside a slot (translate/schema.py)
    bound_body(payload, string_bound(entry.launch.ctx_size, entry.launch.parallel))
    if chat and get_bool(body, "truncate", False):  # asked for: drop the oldest history
        payload["messages"] = await _fit_history(request, name, entry, payload)
    data = json.dumps(payload).encode()
    async with engine_call(request, name, path, body=data, keep_alive=keep_alive,
                           entry=entry, stream=stream) as call:
        if stream:
            converter = ChatStream(name) if chat else GenerateStream(name)
            return await relay_translated(request, call, converter, encode_ndjson)
        answer = await call.json()
        fold = rx.chat_response if chat else rx.generate_response
        return _counted(request, fold(answer, name, load_ns=call.load_ns,
                                      total_ns=call.total_ns()))


async def _fit_history(request: web.Request, name: str, entry: Any,
                       payload: dict[str, Any]) -> list[Any]:
    """Ollama's `truncate: true` on /api/chat: the oldest messages that are neither system
    messages nor the last one are dropped until the prompt (counted by the engine, as it
    templates it) leaves room to answer in the slot's context. Without it, a prompt too long is
    the engine's 400."""
    slot = max(entry.launch.ctx_size // max(entry.launch.parallel, 1), 1)
    wanted = payload.get("max_tokens")
    reserve = min(wanted if isinstance(wanted, int) and wanted > 0 else 256, slot // 2)
    messages = list(payload.get("messages") or [])
    n = 0
    for _ in range(len(messages) + 1):  # one message fewer per round
        n = await chatbridge.count_tokens(request, name, {**payload, "messages": messages})
        if n + reserve <= slot:
            return messages
        oldest = next((i for i, m in enumerate(messages[:-1])
                       if not (isinstance(m, dict) and m.get("role") == "system")), None)
        if oldest is None:
            break
        del messages[oldest]
    raise BadRequest(f"the prompt ({n} tokens) does not fit the model's context ({slot} tokens "
                     f"per slot, {reserve} kept to answer) even with the history truncated")


async def embed(request: web.Request) -> web.Response:
    """/api/embed: a list of inputs, normalised vectors under "embeddings"."""
    return await _embed(request, legacy=False)


async def embeddings(request: web.Request) -> web.Response:
    """/api/embeddings (the older route): one prompt, its vector under "embedding"."""
    return await _embed(request, legacy=True)


async def _embed(request: web.Request, *, legacy: bool) -> web.Response:
    body = await read_json(request)
    name = model_field(body)
    note_request(request, name)
    payload = tx.embeddings_request(body) if legacy else tx.embed_request(body)
    payload["model"] = name
    keep_alive = keep_alive_field(body)
    if not payload["input"]:
        check_keep_alive(request, keep_alive)
        await request.app[keys.SCHEDULER].load(name, keep_alive=keep_alive)
        return jresp({"embedding": []} if legacy else {"model": name, "embeddings": []})
    if not legacy:  # Ollama's `truncate` (default true): cut each input to what fits, or 400
        payload["input"] = await _fit_inputs(request, name, payload["input"],
                                             truncate=get_bool(body, "truncate", True),
                                             keep_alive=keep_alive)
    async with engine_call(request, name, "/v1/embeddings", body=json.dumps(payload).encode(),
                           keep_alive=keep_alive) as call:
        answer = await call.json()
        if legacy:
            return jresp(rx.embeddings_response(answer))
        return jresp(rx.embed_response(answer, name, load_ns=call.load_ns,
                                       total_ns=call.total_ns(),
                                       dimensions=payload.get("dimensions")))


async def _fit_inputs(request: web.Request, name: str, inputs: list[str], *, truncate: bool,
                      keep_alive: float | None) -> list[Any]:
    """Each embed input that fits one engine batch as it is; a longer one cut to its first
    `limit` tokens (sent as token ids) when `truncate`, else a 400 naming both sizes. Only
    inputs whose bytes could exceed the limit are tokenized (a token is at least one byte)."""
    entry = request.app[keys.CATALOG].resolve(name)
    limit = tx.embed_token_limit(entry.launch)
    if limit is None:  # an engine routerd does not know the limits of: it decides
        return inputs
    out: list[Any] = []
    for text in inputs:
        if len(text.encode()) + 4 <= limit:  # BOS/EOS included
            out.append(text)
            continue
        async with engine_call(request, name, "/tokenize", keep_alive=keep_alive,
                               body=json.dumps({"content": text,
                                                "add_special": True}).encode()) as call:
            tokens = (await call.json()).get("tokens") or []
        if len(tokens) <= limit:
            out.append(text)
        elif truncate:
            out.append(tokens[:limit])
        else:
            raise BadRequest(f"input length ({len(tokens)} tokens) exceeds the model's "
                             f"context length ({limit} tokens); send \"truncate\": true "
                             "to cut it")
    return out


def add_routes(app: web.Application) -> None:
    for path, handler in (("/api/chat", chat), ("/api/generate", generate),
                          ("/api/embed", embed), ("/api/embeddings", embeddings)):
        add_route(app, "POST", path, handler, dialect="ollama", inference=True)
