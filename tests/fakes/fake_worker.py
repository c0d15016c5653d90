"""A fake llama-server: a real process speaking llama-server's HTTP API, with fault flags.

Run as ``python tests/fakes/fake_worker.py --host 127.0.0.1 --port N [flags]``; routerd
launches it through a model's ``command:`` list, exactly like an engine. It answers
deterministically: the reply is ``--reply`` split into word tokens (``--tokens N`` cycles the
words to N tokens), one every ``--token-delay`` seconds, cut by the request's ``max_tokens``
(``n_predict`` on ``/completion``). Every request prints ``request METHOD PATH`` to stderr so
tests can count what reached the worker.

Fault flags do what a real engine will not do on demand: ``--slow-start``, ``--exit-on-start``
with ``--stderr``, ``--crash-at-token``, ``--hang-after-ready``, ``--hang-requests``,
``--ignore-sigterm``, ``--fail-health``, ``--rss-mb``, ``--lifeline-fd``. Unknown flags (the
ones routerd passes to a real llama-server, e.g. ``--n-gpu-layers``) are accepted and ignored.

Only aiohttp is imported, so the process binds in well under 0.3 s.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import itertools
import json
import math
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
GENERATION_PATHS = {"/v1/chat/completions", "/v1/completions", "/completion", "/v1/embeddings"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="fake llama-server", allow_abbrev=False)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--api-key", default=os.environ.get("ROUTERD_WORKER_API_KEY"))
    p.add_argument("-m", "--model", default="fake-model.gguf")
    p.add_argument("-a", "--alias", default=None)
    p.add_argument("-c", "--ctx-size", type=int, default=4096)
    p.add_argument("-np", "--parallel", type=int, default=1)
    p.add_argument("--reply", default="Hello from the fake worker.")
    p.add_argument("--tokens", type=int, default=None)
    p.add_argument("--token-delay", type=float, default=0.0)
    p.add_argument("--embedding-dim", type=int, default=8)
    p.add_argument("--slow-start", type=float, default=0.0)
    p.add_argument("--exit-on-start", type=int, default=None)
    p.add_argument("--stderr", default="")
    p.add_argument("--crash-at-token", type=int, default=None)
    p.add_argument("--hang-after-ready", type=float, default=None)
    p.add_argument("--hang-requests", action="store_true")
    p.add_argument("--busy-requests", action="store_true")  # 503 + Retry-After: 7 (a busy peer)
    p.add_argument("--ignore-sigterm", action="store_true")
    p.add_argument("--fail-health", action="store_true")
    p.add_argument("--rss-mb", type=int, default=0)
    p.add_argument("--lifeline-fd", type=int, default=None)
    args, unknown = p.parse_known_args(argv)
    if unknown:
        print(f"fake_worker: ignoring {unknown}", file=sys.stderr, flush=True)
    return args


@dataclass
class Worker:
    args: argparse.Namespace
    ready_at: float
    active: int = 0
    decoded: int = 0  # tokens produced so far (reported by /slots, as llama-server does)
    vocab: dict[str, int] = field(default_factory=dict)
    ballast: bytes = b""

    @property
    def model_id(self) -> str:
        return str(self.args.alias or self.args.model)

    def loading(self) -> bool:
        return time.monotonic() < self.ready_at

    def hung(self) -> bool:
        hang = self.args.hang_after_ready
        return hang is not None and time.monotonic() >= self.ready_at + hang

    def reply_tokens(self, limit: int | None) -> tuple[list[str], str]:
        words = self.args.reply.split() or ["ok"]
        count = self.args.tokens if self.args.tokens is not None else len(words)
        picked = list(itertools.islice(itertools.cycle(words), count))
        finish = "stop"
        if limit is not None and 0 <= limit < len(picked):
            picked, finish = picked[:limit], "length"
        return [w if i == 0 else " " + w for i, w in enumerate(picked)], finish

    def token_id(self, word: str) -> int:
        return self.vocab.setdefault(word, len(self.vocab) + 1)


def count_words(value: object) -> int:
    if isinstance(value, str):
        return len(value.split())
    if isinstance(value, list):
        return sum(count_words(v) for v in value)
    if isinstance(value, dict):
        return count_words(value.get("content") or value.get("text") or "")
    return 0


def timings(prompt_n: int, predicted_n: int, started: float) -> dict[str, float]:
    ms = max((time.monotonic() - started) * 1000.0, 0.001)
    return {
        "cache_n": 0, "prompt_n": prompt_n, "prompt_ms": 0.1,
        "prompt_per_token_ms": 0.1 / max(prompt_n, 1), "prompt_per_second": prompt_n * 10000.0,
        "predicted_n": predicted_n, "predicted_ms": ms,
        "predicted_per_token_ms": ms / max(predicted_n, 1),
        "predicted_per_second": predicted_n * 1000.0 / ms,
    }


def error_body(code: int, message: str, kind: str) -> dict[str, object]:
    return {"error": {"code": code, "message": message, "type": kind}}


async def hang_forever() -> None:
    await asyncio.get_running_loop().create_future()


WORKER = web.AppKey("worker", Worker)


def make_app(worker: Worker) -> web.Application:
    @web.middleware
    async def gate(request: web.Request, handler: Handler) -> web.StreamResponse:
        print(f"request {request.method} {request.path}", file=sys.stderr, flush=True)
        if worker.hung() or (worker.args.hang_requests and request.path in GENERATION_PATHS):
            await hang_forever()
        if worker.args.busy_requests and request.path in GENERATION_PATHS:
            return web.json_response(error_body(503, "all slots busy", "unavailable_error"),
                                     status=503, headers={"Retry-After": "7"})
        if request.path != "/health":
            key = worker.args.api_key
            if key and request.headers.get("Authorization") != f"Bearer {key}":
                body = error_body(401, "Invalid API Key", "authentication_error")
                return web.json_response(body, status=401)
            if worker.loading():
                body = error_body(503, "Loading model", "unavailable_error")
                return web.json_response(body, status=503)
        return await handler(request)

    app = web.Application(middlewares=[gate])
    app[WORKER] = worker
    app.add_routes([web.get(p, h) for p, h in (
        ("/health", health), ("/v1/health", health), ("/v1/models", models),
        ("/models", models), ("/slots", slots), ("/props", props))])
    app.add_routes([web.post(p, h) for p, h in (
        ("/v1/chat/completions", chat_completions), ("/chat/completions", chat_completions),
        ("/v1/completions", completions), ("/completion", native_completion),
        ("/completions", native_completion), ("/v1/embeddings", embeddings),
        ("/embeddings", embeddings), ("/tokenize", tokenize), ("/detokenize", detokenize),
        ("/v1/rerank", rerank))])
    return app


def get_worker(request: web.Request) -> Worker:
    return request.app[WORKER]


async def health(request: web.Request) -> web.Response:
    worker = get_worker(request)
    if worker.loading():
        body = error_body(503, "Loading model", "unavailable_error")  # as llama-server says it
        return web.json_response(body, status=503)
    if worker.args.fail_health:
        return web.json_response(error_body(500, "fake health failure", "server_error"), status=500)
    return web.json_response({"status": "ok"})


async def models(request: web.Request) -> web.Response:
    worker = get_worker(request)
    meta = {"n_ctx_train": worker.args.ctx_size, "n_vocab": 49152, "n_params": 134515008}
    entry = {"id": worker.model_id, "object": "model", "created": int(time.time()),
             "owned_by": "llamacpp", "meta": meta}
    ollama = {"name": worker.model_id, "model": worker.model_id, "type": "model",
              "capabilities": ["completion"]}
    return web.json_response({"models": [ollama], "object": "list", "data": [entry]})


async def slots(request: web.Request) -> web.Response:
    worker = get_worker(request)
    return web.json_response([
        {"id": i, "n_ctx": worker.args.ctx_size // worker.args.parallel,
         "is_processing": i < worker.active, "next_token": [{"n_decoded": worker.decoded}]}
        for i in range(worker.args.parallel)
    ])


async def props(request: web.Request) -> web.Response:
    worker = get_worker(request)
    return web.json_response({
        "default_generation_settings": {"n_ctx": worker.args.ctx_size, "model": worker.model_id},
        "total_slots": worker.args.parallel,
        "model_path": worker.args.model,
        "chat_template": "{% for m in messages %}{{ m.content }}{% endfor %}",
        "build_info": "b0000-fake",
    })


async def read_json(request: web.Request) -> dict[str, object]:
    try:
        body = await request.json()
    except (ValueError, UnicodeDecodeError):
        raise web.HTTPBadRequest(
            text=json.dumps(error_body(400, "invalid JSON body", "invalid_request_error")),
            content_type="application/json") from None
    return body if isinstance(body, dict) else {}


def max_tokens(body: dict[str, object], *names: str) -> int | None:
    for name in names:
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool):
            return None if value < 0 else value
    return None


async def generate(worker: Worker, tokens: list[str]) -> AsyncIterator[str]:
    """Yield tokens at the configured pace; crash or hang where the flags say so."""
    worker.active += 1
    try:
        for i, token in enumerate(tokens):
            if worker.args.crash_at_token is not None and i >= worker.args.crash_at_token:
                print("fake_worker: crashing as asked", file=sys.stderr, flush=True)
                os._exit(1)
            if worker.args.token_delay > 0:
                await asyncio.sleep(worker.args.token_delay)
            if worker.hung():
                await hang_forever()
            worker.decoded += 1
            yield token
    finally:
        worker.active -= 1


async def open_sse(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                       "Cache-Control": "no-cache"})
    await resp.prepare(request)
    return resp


async def send_event(resp: web.StreamResponse, payload: object) -> None:
    data = payload if isinstance(payload, str) else json.dumps(payload)
    await resp.write(f"data: {data}\n\n".encode())


def usage(prompt_n: int, predicted_n: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_n, "completion_tokens": predicted_n,
            "total_tokens": prompt_n + predicted_n}


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await openai_completion(request, chat=True)


async def completions(request: web.Request) -> web.StreamResponse:
    return await openai_completion(request, chat=False)


async def openai_completion(request: web.Request, *, chat: bool) -> web.StreamResponse:
    worker, body, started = get_worker(request), await read_json(request), time.monotonic()
    prompt_n = count_words(body.get("messages") if chat else body.get("prompt"))
    tokens, finish = worker.reply_tokens(max_tokens(body, "max_completion_tokens", "max_tokens"))
    cid = ("chatcmpl-" if chat else "cmpl-") + hashlib.sha1(str(started).encode()).hexdigest()[:24]
    head = {"id": cid, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()), "model": worker.model_id,
            "system_fingerprint": "b0000-fake"}

    def choice(text: str | None, reason: str | None) -> dict[str, object]:
        if not chat:
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}
        delta = {} if text is None else {"content": text}
        return {"index": 0, "delta": delta, "finish_reason": reason}

    if not body.get("stream"):
        text = "".join([t async for t in generate(worker, tokens)])
        message = {"role": "assistant", "content": text}
        only = ({"index": 0, "message": message, "finish_reason": finish} if chat
                else {"index": 0, "text": text, "logprobs": None, "finish_reason": finish})
        head["object"] = "chat.completion" if chat else "text_completion"
        return web.json_response({**head, "choices": [only], "usage": usage(prompt_n, len(tokens)),
                                  "timings": timings(prompt_n, len(tokens), started)})
    resp = await open_sse(request)
    if chat:
        first = {"index": 0, "delta": {"role": "assistant", "content": None},
                 "finish_reason": None}
        await send_event(resp, {**head, "choices": [first]})
    async for token in generate(worker, tokens):
        await send_event(resp, {**head, "choices": [choice(token, None)]})
    # llama-server puts timings on the last chunk: the usage chunk when one is asked for.
    stats = {"timings": timings(prompt_n, len(tokens), started)}
    options = body.get("stream_options")
    with_usage = isinstance(options, dict) and bool(options.get("include_usage"))
    await send_event(resp, {**head, "choices": [choice(None, finish)],
                            **({} if with_usage else stats)})
    if with_usage:
        await send_event(resp, {**head, "choices": [], "usage": usage(prompt_n, len(tokens)),
                                **stats})
    await send_event(resp, "[DONE]")
    await resp.write_eof()
    return resp


async def native_completion(request: web.Request) -> web.StreamResponse:
    worker, body, started = get_worker(request), await read_json(request), time.monotonic()
    prompt_n = count_words(body.get("prompt"))
    tokens, finish = worker.reply_tokens(max_tokens(body, "n_predict", "max_tokens"))

    def final(content: str) -> dict[str, object]:
        return {"index": 0, "content": content, "stop": True, "id_slot": 0,
                "model": worker.model_id,
                "tokens_predicted": len(tokens), "tokens_evaluated": prompt_n,
                "stop_type": "limit" if finish == "length" else "eos", "truncated": False,
                "timings": timings(prompt_n, len(tokens), started)}

    if not body.get("stream"):
        text = "".join([t async for t in generate(worker, tokens)])
        return web.json_response(final(text))
    resp = await open_sse(request)
    n = 0
    async for token in generate(worker, tokens):
        n += 1
        await send_event(resp, {"index": 0, "content": token, "tokens": [worker.token_id(token)],
                                "stop": False, "id_slot": -1, "tokens_predicted": n,
                                "tokens_evaluated": prompt_n})
    await send_event(resp, final(""))
    await resp.write_eof()
    return resp


def embed(text: str, dim: int) -> list[float]:
    digest = hashlib.sha256(text.encode()).digest()
    raw = [(digest[i % len(digest)] - 127.5) / 127.5 for i in range(dim)]
    norm = math.sqrt(sum(v * v for v in raw)) or 1.0
    return [v / norm for v in raw]


async def embeddings(request: web.Request) -> web.Response:
    worker, body = get_worker(request), await read_json(request)
    raw = body.get("input", body.get("content", ""))
    inputs = [str(x) for x in raw] if isinstance(raw, list) else [str(raw)]
    async for _ in generate(worker, []):
        pass
    data = [{"object": "embedding", "index": i, "embedding": embed(t, worker.args.embedding_dim)}
            for i, t in enumerate(inputs)]
    n = count_words(inputs)
    return web.json_response({"object": "list", "model": worker.model_id, "data": data,
                              "usage": {"prompt_tokens": n, "total_tokens": n}})


async def rerank(request: web.Request) -> web.Response:
    """llama-server's /v1/rerank: score = words shared with the query; sorted; top_n."""
    body = await read_json(request)
    query = set(str(body.get("query", "")).lower().split())
    docs = [str(d) for d in body.get("documents") or []]
    results = sorted(({"index": i, "relevance_score": float(len(query & set(d.lower().split())))}
                      for i, d in enumerate(docs)), key=lambda r: -r["relevance_score"])
    n = count_words(docs)
    return web.json_response({"model": get_worker(request).model_id, "object": "list",
                              "usage": {"prompt_tokens": n, "total_tokens": n},
                              "results": results[:int(body.get("top_n") or len(docs))]})


async def tokenize(request: web.Request) -> web.Response:
    worker, body = get_worker(request), await read_json(request)
    words = str(body.get("content", "")).split()
    ids = [worker.token_id(w) for w in words]
    if body.get("with_pieces"):
        return web.json_response({"tokens": [{"id": i, "piece": w} for i, w in zip(ids, words)]})
    return web.json_response({"tokens": ids})


async def detokenize(request: web.Request) -> web.Response:
    worker, body = get_worker(request), await read_json(request)
    names = {v: k for k, v in worker.vocab.items()}
    raw = body.get("tokens", [])
    ids = raw if isinstance(raw, list) else []
    return web.json_response({"content": " ".join(names.get(i, f"<{i}>") for i in ids)})


def watch_lifeline(loop: asyncio.AbstractEventLoop, fd: int) -> None:
    def on_readable() -> None:
        try:
            data = os.read(fd, 4096)
        except OSError:
            data = b""
        if not data:
            print("fake_worker: lifeline closed, exiting", file=sys.stderr, flush=True)
            os._exit(0)

    loop.add_reader(fd, on_readable)


async def serve(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    worker = Worker(args=args, ready_at=time.monotonic() + args.slow_start)
    if args.rss_mb > 0:
        worker.ballast = b"\x01" * (args.rss_mb * 1024 * 1024)  # written, so resident
    if args.lifeline_fd is not None:
        watch_lifeline(loop, args.lifeline_fd)
    stop = asyncio.Event()
    if args.ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    runner = web.AppRunner(make_app(worker), access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    await web.TCPSite(runner, args.host, args.port).start()
    print(f"fake_worker: listening on http://{args.host}:{args.port} model={worker.model_id}",
          file=sys.stderr, flush=True)
    if args.slow_start > 0:  # /health answers 503 until then, like llama-server loading
        loop.call_at(loop.time() + max(0.0, worker.ready_at - time.monotonic()), lambda: print(
            "fake_worker: model loaded", file=sys.stderr, flush=True))
    try:
        await stop.wait()
    finally:
        print("fake_worker: shutting down", file=sys.stderr, flush=True)
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.exit_on_start is not None:
        if args.stderr:
            print(args.stderr, file=sys.stderr, flush=True)
        return int(args.exit_on_start)
    asyncio.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
