"""Request completions: one record per inference request, published as `request.done`.

`activity_middleware` (innermost in the app's chain) times every request that named a model
and, when it ends, publishes what is known about it on the event bus and keeps it in the
dashboard's `ActivityLog`. The request path adds what only it knows (tokens, time to first
token, load wait, an in-band error) with `note(request, ...)`: a dict update, nothing more.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, AsyncIterator, Awaitable, Callable

from aiohttp import web

from .api.common import MODEL_NAME
from .api.security import API_KEY
from .errors import RouterdError
from .keys import EVENTS

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
NOTES = web.RequestKey("activity_notes", dict)
# Where finished requests go (set by the dashboard's context): a callable taking the record.
ACTIVITY: web.AppKey[Callable[[dict[str, Any]], None]] = web.AppKey("activity_sink")
PULL_EVERY = 0.25  # seconds between two progress events of one layer
_QUIET = ("/api/events", "/ui", "/api/ui/", "/metrics", "/api/ps", "/api/tags", "/api/show",
          "/api/logs", "/api/version", "/api/pull", "/api/delete")


def note(request: web.Request, **fields: Any) -> None:
    """Attach facts to the request's activity record (never raises)."""
    try:
        notes = request.get(NOTES)
        if notes is None:
            notes = request[NOTES] = {}
        notes.update(fields)
    except Exception:  # noqa: BLE001 - bookkeeping must never fail a request
        pass


def dialect_of(path: str) -> str:
    if path.startswith("/v1/messages"):
        return "anthropic"
    if path.startswith("/v1/"):
        return "openai"
    if path.startswith("/api/"):
        return "ollama"
    return "llama.cpp"


def _client(request: web.Request) -> str:
    entry = request.get(API_KEY)
    label = getattr(entry, "name", None) or getattr(entry, "label", None)
    return f"key {label}" if label else (request.remote or "")


def _record(request: web.Request, model: str, status: int, seconds: float,
            error: str | None) -> dict[str, Any]:
    notes: dict[str, Any] = request.get(NOTES) or {}
    rec: dict[str, Any] = {
        "started": time.time() - seconds, "model": model, "route": request.path,
        "method": request.method, "dialect": dialect_of(request.path), "status": status,
        "client": _client(request), "duration_ms": round(seconds * 1000, 1),
        "prompt_tokens": notes.get("prompt_tokens"), "output_tokens": notes.get("output_tokens"),
        "ttft_ms": notes.get("ttft_ms"), "load_wait_ms": notes.get("load_wait_ms"),
        "tokens_per_s": notes.get("tokens_per_s"), "kind": notes.get("kind"),
    }
    err = error or notes.get("error")
    if err:
        rec["error"] = str(err)[:500]
    if rec["tokens_per_s"] is None and rec["output_tokens"] and rec["ttft_ms"] is not None:
        gen = seconds - rec["ttft_ms"] / 1000
        if gen > 0:
            rec["tokens_per_s"] = round(rec["output_tokens"] / gen, 1)
    return rec


@web.middleware
async def activity_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path.startswith(_QUIET):
        return await handler(request)
    t0 = time.monotonic()
    status, error = 500, None
    try:
        resp = await handler(request)
        status = resp.status
        return resp
    except RouterdError as e:
        status, error = e.status, e.message
        raise
    except web.HTTPException as e:
        status, error = e.status, e.reason
        raise
    except BaseException as e:
        error = str(e) or type(e).__name__
        raise
    finally:
        model = request.get(MODEL_NAME)
        if model:
            _finish(request, model, status, time.monotonic() - t0, error)


def _finish(request: web.Request, model: str, status: int, seconds: float,
            error: str | None) -> None:
    try:
        rec = _record(request, model, status, seconds, error)
        sink = request.app.get(ACTIVITY)
        if sink is not None:
            sink(rec)
    except Exception:  # noqa: BLE001 - bookkeeping must never fail a request
        pass


def note_call(request: web.Request, call: Any) -> None:
    """A call to an engine answered: the lease wait (queue + load) and the first byte."""
    try:
        now = time.monotonic()
        note(request, load_wait_ms=round(call.waited * 1000, 1),
             ttft_ms=round((now - call.started) * 1000, 1))
        bus = request.app.get(EVENTS)
        if bus is not None:  # a slot is busy from now on (the overview shows it)
            bus.publish("request.started", model=call.name, route=request.path)
    except Exception:  # noqa: BLE001
        pass


def note_usage(request: web.Request, answer: Any) -> None:
    """Token counts from an engine's answer: OpenAI `usage`, llama.cpp `timings`, or an
    Ollama final chunk. `answer` is a dict, or the bytes of a JSON body / an SSE tail."""
    try:
        obj = answer if isinstance(answer, dict) else _last_json(answer)
        if not obj:
            return
        fields: dict[str, Any] = {}
        if "eval_count" in obj:  # Ollama
            fields["prompt_tokens"] = obj.get("prompt_eval_count")
            fields["output_tokens"] = obj.get("eval_count")
            if obj.get("eval_duration"):
                fields["tokens_per_s"] = round(obj["eval_count"] / (obj["eval_duration"] / 1e9), 1)
        timings = obj.get("timings")
        if isinstance(timings, dict):  # llama.cpp
            fields["prompt_tokens"] = timings.get("prompt_n")
            fields["output_tokens"] = timings.get("predicted_n")
            if timings.get("predicted_per_second"):
                fields["tokens_per_s"] = round(float(timings["predicted_per_second"]), 1)
        usage = obj.get("usage")
        if isinstance(usage, dict):  # OpenAI (and Anthropic's names)
            fields.setdefault("prompt_tokens", usage.get("prompt_tokens",
                                                         usage.get("input_tokens")))
            fields.setdefault("output_tokens", usage.get("completion_tokens",
                                                         usage.get("output_tokens")))
        note(request, **{k: v for k, v in fields.items() if v is not None})
    except Exception:  # noqa: BLE001
        pass


def _last_json(raw: bytes) -> dict[str, Any] | None:
    """The last JSON object in a body or an SSE tail that carries usage or timings."""
    import json

    text = raw.decode("utf-8", "replace").strip()
    if text.startswith("{"):
        obj = json.loads(text)
        return obj if isinstance(obj, dict) else None
    for block in reversed(text.split("data:")):
        block = block.strip()
        if block.startswith("{") and ('"usage"' in block or '"timings"' in block):
            end = block.rfind("}")
            obj = json.loads(block[:end + 1])
            return obj if isinstance(obj, dict) else None
    return None


async def published_pull(bus: Any, name: str,
                         events: AsyncIterator[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
    """Pass a pull's progress through, publishing `pull.progress` (each status change, and
    per layer at most every PULL_EVERY s), then `pull.done` or `pull.failed`."""
    last: dict[str, float] = {}
    status = None
    try:
        async for ev in events:
            digest = ev.get("digest") or ""
            now = time.monotonic()
            done = ev.get("total") and ev.get("completed") == ev.get("total")
            if ev.get("status") != status or done or now - last.get(digest, 0.0) >= PULL_EVERY:
                status, last[digest] = ev.get("status"), now
                bus.publish("pull.progress", model=name, **ev)
            yield ev
    except BaseException as e:
        cancelled = isinstance(e, (GeneratorExit, asyncio.CancelledError, ConnectionError))
        bus.publish("pull.failed", model=name,
                    error="cancelled" if cancelled else (str(e) or type(e).__name__))
        raise
    if status == "success":
        bus.publish("pull.done", model=name)
    else:
        bus.publish("pull.failed", model=name, error=f"ended after {status!r}")
