"""The dashboard: `/ui/` (static ES modules under routerd/ui/), its JSON views under
`/api/ui/`, and the live event stream `GET /api/events` (SSE) it and other tools use.

Every route here goes through the app's middlewares like any other: Host and Origin checks,
API keys. The page itself is static; it reads JSON from this same origin only.

`GET /api/events`: `text/event-stream`, one JSON object per `data:` line, each with `id`,
`type` and `time`. A first `hello` event says the subscription is live; `?types=model.,pull.`
keeps only events whose type starts with one of the prefixes; `Last-Event-ID` (or `?since=N`)
replays the recent events after N first. A `: ping` comment every 15 s keeps proxies open.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import mimetypes
import time
from pathlib import Path
from typing import Any, AsyncIterator

import structlog
from aiohttp import web

from .. import keys
from ..activity import ACTIVITY
from ..errors import BadRequest
from ..events import EventBus
from ..history import ActivityLog, History
from . import ui_views

log = structlog.get_logger(__name__)

UI_DIR = Path(__file__).resolve().parent.parent / "ui"
HISTORY: web.AppKey[History] = web.AppKey("ui_history", History)
ACTIVITY_LOG: web.AppKey[ActivityLog] = web.AppKey("ui_activity", ActivityLog)
LOAD_TIMES: web.AppKey[dict[str, float]] = web.AppKey("ui_load_times", dict)
FAILURES: web.AppKey[dict[str, dict[str, Any]]] = web.AppKey("ui_failures", dict)
VERSIONS: web.AppKey[EngineVersions] = web.AppKey("ui_versions")
PING_EVERY = 15.0
_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; font-src 'self'; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'")
_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css",
          ".svg": "image/svg+xml", ".png": "image/png", ".ico": "image/x-icon",
          ".txt": "text/plain", ".json": "application/json"}


def add_routes(app: web.Application) -> None:
    app.router.add_get("/ui", ui_redirect)
    app.router.add_get("/ui/", ui_index)
    app.router.add_get("/ui/static/{path:.+}", ui_static)
    app.router.add_get("/api/events", events)
    app.router.add_get("/api/ui/overview", api_overview)
    app.router.add_get("/api/ui/requests", api_requests)
    app.router.add_get("/api/ui/history", api_history)
    app.router.add_get("/api/ui/model", api_model)
    app.cleanup_ctx.append(ui_context)  # after the scheduler's: it reads the scheduler
    app.on_shutdown.append(close_streams)


# ---------------------------------------------------------------- lifecycle


async def ui_context(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx (after the scheduler's): history, the activity log, the last failure and
    load time per model, all fed by the event bus (an in-process listener, no task)."""
    bus: EventBus = app[keys.EVENTS]
    history, activity = History(), ActivityLog()
    load_times: dict[str, float] = {}
    failures: dict[str, dict[str, Any]] = {}
    app[HISTORY], app[ACTIVITY_LOG], app[LOAD_TIMES] = history, activity, load_times
    app[FAILURES] = failures
    rids = itertools.count(1)

    def record(rec: dict[str, Any]) -> None:
        rec["rid"] = next(rids)
        activity.add(rec)
        bus.publish("request.done", **rec)

    def on_event(ev: dict[str, Any]) -> None:
        kind, model = ev.get("type"), ev.get("model")
        if not model:
            return
        if kind == "request.done" and ev.get("tokens_per_s"):
            history.add_tokens_per_s(model, float(ev["tokens_per_s"]), ev["time"])
        elif kind == "model.memory":
            history.add_memory(model, dict(ev.get("measured") or ev.get("booked") or {}),
                               ev["time"])
        elif kind == "model.state":
            state = ev.get("state")
            if state == "ready" and ev.get("load_seconds"):
                load_times[model] = float(ev["load_seconds"])
            elif state == "failed":
                failures[model] = {"reason": ev.get("reason") or "failed",
                                   "code": ev.get("code"), "time": ev["time"]}
                if len(failures) > 256:
                    failures.pop(next(iter(failures)))
            if state in ("not_loaded", "failed") and model in history.memory:
                history.add_memory(model, {r: 0 for r in history.memory[model]}, ev["time"])

    app[ACTIVITY] = record
    stop_listening = bus.listen(on_event)
    versions = EngineVersions(app[keys.CONFIG].engines.llama_server)
    app[VERSIONS] = versions
    yield
    stop_listening()
    await versions.close()


class EngineVersions:
    """The engines' versions for the host facts, asked once, on the first overview (a
    daemon nobody looks at never runs `llama-server --version`)."""

    def __init__(self, setting: str) -> None:
        self.setting = setting
        self.found: dict[str, str] = {}
        self._task: asyncio.Task[None] | None = None

    def get(self) -> dict[str, str]:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._probe())
        return self.found

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _probe(self) -> None:
        from importlib import metadata

        from ..workers.backends import find_llama_server

        with contextlib.suppress(metadata.PackageNotFoundError):
            self.found["llama-cpp-python"] = metadata.version("llama_cpp_python")
        path = find_llama_server(self.setting)
        if not path:
            return
        proc = None
        try:
            proc = await asyncio.create_subprocess_exec(
                path, "--version", stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
            out, _ = await asyncio.wait_for(proc.communicate(), 10)
        except (OSError, asyncio.TimeoutError) as e:
            log.info("ui.engine_version_unknown", engine=path, error=str(e))
            return
        finally:
            if proc is not None and proc.returncode is None:
                proc.kill()
                await proc.wait()
        for line in out.decode(errors="replace").splitlines():
            if line.startswith("version:"):
                self.found["llama-server"] = line.split(":", 1)[1].strip()
                break


# ---------------------------------------------------------------- the page


async def ui_redirect(request: web.Request) -> web.StreamResponse:
    raise web.HTTPFound("/ui/")


def _page_headers(ctype: str) -> dict[str, str]:
    return {"Content-Type": ctype, "Cache-Control": "no-cache",
            "X-Content-Type-Options": "nosniff", "Content-Security-Policy": _CSP,
            "Referrer-Policy": "no-referrer", "X-Frame-Options": "DENY"}


async def ui_index(request: web.Request) -> web.StreamResponse:
    return web.FileResponse(UI_DIR / "index.html", headers=_page_headers("text/html"))


async def ui_static(request: web.Request) -> web.StreamResponse:
    rel = request.match_info["path"]
    path = (UI_DIR / rel).resolve()
    if UI_DIR not in path.parents or not path.is_file() or path.suffix not in _TYPES:
        raise web.HTTPNotFound()
    ctype = _TYPES.get(path.suffix) or mimetypes.guess_type(path.name)[0] or "text/plain"
    return web.FileResponse(path, headers=_page_headers(ctype))


# ---------------------------------------------------------------- JSON views


def _jresp(data: Any) -> web.Response:
    return web.json_response(data, headers={"Cache-Control": "no-store"})


async def api_overview(request: web.Request) -> web.Response:
    app = request.app
    scheduler = app[keys.SCHEDULER]
    view = ui_views.overview(scheduler, app[keys.CATALOG], scheduler.acct, app[VERSIONS].get(),
                             app[LOAD_TIMES], app[keys.CONFIG].keep_alive)
    view["last_failure"] = app[FAILURES]
    view["peers"] = app[keys.PEERS].status() if keys.PEERS in app else []  # routerd/peers/
    view["events"] = {"subscribers": app[keys.EVENTS].subscribers}
    return _jresp(view)


def _int(request: web.Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        return max(lo, min(hi, int(raw)))
    except ValueError:
        raise BadRequest(f"{name} must be an integer") from None


async def api_requests(request: web.Request) -> web.Response:
    n = _int(request, "n", 100, 0, 1000)
    return _jresp({"requests": request.app[ACTIVITY_LOG].last(n, request.query.get("model"))})


async def api_history(request: web.Request) -> web.Response:
    return _jresp(request.app[HISTORY].snapshot())


async def api_model(request: web.Request) -> web.Response:
    name = request.query.get("name")
    if not name:
        raise BadRequest("name is required (?name=MODEL)")
    app = request.app
    entry = app[keys.CATALOG].resolve(name)
    from ..workers.backends import find_llama_server

    scheduler = app[keys.SCHEDULER]
    llama = find_llama_server(app[keys.CONFIG].engines.llama_server)
    return _jresp(ui_views.model_detail(entry, scheduler.acct, scheduler.runners.get(entry.name),
                                        llama))


# ---------------------------------------------------------------- /api/events


def _frame(event: dict[str, Any], with_id: bool = True) -> bytes:
    data = json.dumps(event, separators=(",", ":"), default=str)
    head = f"id: {event['id']}\n" if with_id and "id" in event else ""
    return f"{head}data: {data}\n\n".encode()


def _since(request: web.Request) -> int | None:
    raw = request.headers.get("Last-Event-ID") or request.query.get("since")
    if raw is None or raw == "":
        return None
    try:
        return int(raw)
    except ValueError:
        raise BadRequest("Last-Event-ID / since must be an integer") from None


async def events(request: web.Request) -> web.StreamResponse:
    bus: EventBus = request.app[keys.EVENTS]
    prefixes = tuple(p for p in request.query.get("types", "").split(",") if p)
    since = _since(request)

    def wanted(ev: dict[str, Any]) -> bool:
        return not prefixes or str(ev.get("type", "")).startswith(prefixes)

    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                       "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    last = bus.last_id  # no await until subscribed: nothing falls between backlog and queue
    with bus.subscribe() as sub:
        await resp.prepare(request)
        await resp.write(b"retry: 2000\n\n" + _frame(
            {"type": "hello", "time": time.time(), "last_id": last}, with_id=False))
        if since is not None:
            backlog = b"".join(_frame(ev) for ev in list(bus.recent)
                               if since < ev["id"] <= last and wanted(ev))
            if backlog:
                await resp.write(backlog)
        try:
            await _pump(request, resp, sub, wanted, last)
        except ConnectionError:
            return resp  # the client left
    with contextlib.suppress(ConnectionError):
        await resp.write_eof()
    return resp


async def close_streams(app: web.Application) -> None:
    """on_shutdown: end every event stream, so none holds the drain open."""
    app[keys.EVENTS].close()


async def _pump(request: web.Request, resp: web.StreamResponse, sub: Any,
                wanted: Any, last: int) -> None:
    quiet_since = time.monotonic()
    dropped = 0
    while True:
        transport = request.transport
        if transport is None or transport.is_closing() or sub.closed:
            return
        event = await sub.get(timeout=1.0)  # wakes at least every second to see a departure
        if event is None:
            if time.monotonic() - quiet_since >= PING_EVERY:
                await resp.write(b": ping\n\n")
                quiet_since = time.monotonic()
            continue
        quiet_since = time.monotonic()
        out = bytearray()
        if sub.dropped != dropped:
            out += _frame({"type": "events.lost", "time": time.time(),
                           "count": sub.dropped - dropped}, with_id=False)
            dropped = sub.dropped
        if event["id"] > last and wanted(event):
            out += _frame(event)
        if out:
            await resp.write(bytes(out))
