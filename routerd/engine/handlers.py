"""HTTP handlers of the engine worker: llama-server's routes over one EngineLlama."""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable

from aiohttp import web

from routerd.engine import jobs, wire
from routerd.engine.options import EngineOptions
from routerd.engine.runner import ModelRunner, Piece
from routerd.bodies import parse_object, stream_flag
from routerd.errors import BadRequest

if TYPE_CHECKING:
    from routerd.engine.llm import EngineLlama, ModelInfo

SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
               "X-Accel-Buffering": "no"}


@dataclass
class EngineState:
    """What the handlers share: options, and the model once it is loaded."""

    opts: EngineOptions
    runner: ModelRunner[EngineLlama] | None = None
    info: ModelInfo | None = None
    created: int = field(default_factory=lambda: int(time.time()))

    def ready(self) -> tuple[ModelRunner[EngineLlama], ModelInfo]:
        if self.runner is None or self.info is None:
            raise wire.Unavailable("Loading model")
        return self.runner, self.info


ENGINE = web.AppKey("engine", EngineState)


async def read_json(request: web.Request) -> dict[str, Any]:
    return parse_object(await request.read())


# -- health and metadata -------------------------------------------------------------


async def health(request: web.Request) -> web.Response:
    state = request.app[ENGINE]
    if state.runner is None:
        return web.json_response({"status": "loading model"}, status=503)
    return web.json_response({"status": "ok"})


async def models(request: web.Request) -> web.Response:
    state = request.app[ENGINE]
    _, info = state.ready()
    meta = {"n_vocab": info.n_vocab, "n_ctx_train": info.n_ctx_train, "n_embd": info.n_embd,
            "n_params": info.n_params, "size": info.size}
    return web.json_response({"object": "list", "data": [
        {"id": state.opts.model_name, "object": "model", "created": state.created,
         "owned_by": "llamacpp", "meta": meta}]})


async def props(request: web.Request) -> web.Response:
    state = request.app[ENGINE]
    runner, info = state.ready()
    return web.json_response({
        "default_generation_settings": {"n_ctx": info.n_ctx, "model": state.opts.model_name,
                                        "params": dict(wire.SAMPLING_DEFAULTS)},
        "total_slots": runner.slots,
        "model_path": info.path,
        "chat_template": info.chat_template,
        "modalities": {"vision": False, "audio": False},
        "build_info": "routerd-engine (llama-cpp-python)",
    })


async def slots(request: web.Request) -> web.Response:
    runner, info = request.app[ENGINE].ready()
    # next_token.n_decoded moves while a job produces: routerd's hang watch reads it.
    return web.json_response([{"id": i, "n_ctx": info.n_ctx, "is_processing": busy,
                               "next_token": [{"n_decoded": runner.produced}]}
                              for i, busy in enumerate(runner.slot_states())])


# -- tokens --------------------------------------------------------------------------


async def tokenize(request: web.Request) -> web.Response:
    runner, _ = request.app[ENGINE].ready()
    body = await read_json(request)
    content = body.get("content")
    if not isinstance(content, str):
        raise BadRequest("'content' must be a string")
    llm = runner.model
    # Tokenizing reads only the vocabulary: safe beside a running generation.
    tokens = await asyncio.to_thread(llm.tokenize, content.encode("utf-8"),
                                     bool(body.get("add_special", False)), True)
    if not body.get("with_pieces"):
        return web.json_response({"tokens": tokens})
    pieces = []
    for token in tokens:
        raw = llm.detokenize([token], special=True)
        try:
            pieces.append({"id": token, "piece": raw.decode("utf-8")})
        except UnicodeDecodeError:
            pieces.append({"id": token, "piece": list(raw)})
    return web.json_response({"tokens": pieces})


async def detokenize(request: web.Request) -> web.Response:
    runner, info = request.app[ENGINE].ready()
    body = await read_json(request)
    tokens = body.get("tokens")
    if not isinstance(tokens, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) and 0 <= t < info.n_vocab
            for t in tokens):
        raise BadRequest("'tokens' must be a list of token ids")
    raw = await asyncio.to_thread(runner.model.detokenize, tokens, None, True)
    return web.json_response({"content": raw.decode("utf-8", "replace")})


# -- generation ----------------------------------------------------------------------


async def chat_completions(request: web.Request) -> web.StreamResponse:
    state = request.app[ENGINE]
    body = await read_json(request)
    kwargs = wire.chat_kwargs(body, state.opts.model_name)
    return await _openai(request, jobs.CHAT, kwargs, body)


async def completions(request: web.Request) -> web.StreamResponse:
    state = request.app[ENGINE]
    body = await read_json(request)
    kwargs = wire.completion_kwargs(body, state.opts.model_name)
    return await _openai(request, jobs.COMPLETION, kwargs, body)


async def _openai(request: web.Request, method: str, kwargs: dict[str, Any],
                  body: dict[str, Any]) -> web.StreamResponse:
    runner, _ = request.app[ENGINE].ready()
    stream = stream_flag(body, default=False)
    job = jobs.generation(method, kwargs, stream)
    if not stream:
        piece = await runner.call(job)
        assert piece.stats is not None
        return web.json_response(wire.with_stats(piece.data, piece.stats))
    usage = wire.include_usage(body)

    def encode(piece: Piece) -> list[bytes]:
        if piece.stats is None:
            return [wire.sse(piece.data)]
        out = [wire.sse({**piece.data, "timings": piece.stats.timings()})]
        if usage:
            out.append(wire.sse(wire.usage_chunk(piece.data, piece.stats)))
        return out

    return await _relay(request, runner.stream(job), encode, tail=wire.DONE)


async def completion(request: web.Request) -> web.StreamResponse:
    """llama.cpp's native /completion: `content` pieces, then a final `stop: true` object."""
    state = request.app[ENGINE]
    runner, _ = state.ready()
    body = await read_json(request)
    kwargs = wire.completion_kwargs(body, state.opts.model_name)
    stream = stream_flag(body, default=False)
    job = jobs.generation(jobs.COMPLETION, kwargs, stream)
    name, stop_words = state.opts.model_name, kwargs["stop"]
    if not stream:
        piece = await runner.call(job)
        assert piece.stats is not None
        text = piece.data["choices"][0]["text"]
        return web.json_response(wire.native_final(
            text, jobs.finish_reason(piece.data), piece.stats, name, stop_words))

    def encode(piece: Piece) -> list[bytes]:
        text = piece.data["choices"][0].get("text") or ""
        out = [wire.sse(wire.native_chunk(text))] if text else []
        if piece.stats is not None:
            out.append(wire.sse(wire.native_final(
                "", jobs.finish_reason(piece.data), piece.stats, name, stop_words)))
        return out

    return await _relay(request, runner.stream(job), encode, tail=b"")


Encoder = Callable[[Piece], list[bytes]]


async def _relay(request: web.Request, pieces: AsyncIterator[Piece], encode: Encoder,
                 tail: bytes) -> web.StreamResponse:
    """Stream pieces as SSE. An error before the first piece is a plain HTTP error;
    after it, it goes in-band. Leaving early (client gone) cancels the generation."""
    async with contextlib.aclosing(pieces):  # type: ignore[type-var]
        first = await anext(pieces, None)
        response = web.StreamResponse(headers=SSE_HEADERS)
        await response.prepare(request)
        try:
            piece = first
            while piece is not None:
                for data in encode(piece):
                    await response.write(data)
                piece = await anext(pieces, None)
        except (ConnectionResetError, asyncio.CancelledError):
            raise
        except Exception as exc:  # after the first byte: report in-band, end cleanly
            await response.write(wire.sse(wire.error_body(wire.as_routerd_error(exc))))
        if tail:
            await response.write(tail)
        await response.write_eof()
        return response


# -- embeddings ----------------------------------------------------------------------


async def embeddings(request: web.Request) -> web.Response:
    state = request.app[ENGINE]
    runner, info = state.ready()
    if not state.opts.embeddings:
        raise wire.NotSupported(
            "This server does not support embeddings. Start it with `--embeddings`")
    if info.pooling == "none":
        raise BadRequest("Pooling type 'none' is not OAI compatible. "
                         "Please use a different pooling type")
    body = await read_json(request)
    inputs = wire.embedding_inputs(body)
    vectors, n_tokens = await runner.call(jobs.embedding(inputs))
    return web.json_response({
        "object": "list", "model": state.opts.model_name,
        "data": [{"object": "embedding", "index": i, "embedding": v}
                 for i, v in enumerate(vectors)],
        "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens},
    })


ROUTES = [
    web.get("/health", health),
    web.get("/v1/health", health),
    web.get("/v1/models", models),
    web.get("/models", models),
    web.get("/props", props),
    web.get("/slots", slots),
    web.post("/tokenize", tokenize),
    web.post("/detokenize", detokenize),
    web.post("/v1/chat/completions", chat_completions),
    web.post("/chat/completions", chat_completions),
    web.post("/v1/completions", completions),
    web.post("/completion", completion),
    web.post("/completions", completion),
    web.post("/v1/embeddings", embeddings),
]
