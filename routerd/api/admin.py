"""Listing and operations: /api/tags, /api/ps, /api/show, /api/version, /, /api/logs, /metrics."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import weakref
from typing import Any

import structlog
from aiohttp import web

from .. import __version__, keys
from ..catalog import ModelEntry
from ..errors import BadRequest, ModelNotFound
from ..scheduler.accounting import read_info
from ..store import gguf
from . import capabilities, peer_views
from .common import add_route, note_request, read_json, jresp
from .security import model_visible

OLLAMA_API_VERSION = "0.12.0"  # the Ollama API level routerd speaks

log = structlog.get_logger(__name__)
# A verbose /api/show reads the whole GGUF (seconds for a large vocabulary): in a thread, and
# one at a time per loop, so many of them hold one worker thread and never the event loop.
_VERBOSE_GATES: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = \
    weakref.WeakKeyDictionary()


def _rfc3339(t: dt.datetime | None) -> str:
    t = t or dt.datetime.fromtimestamp(0, dt.timezone.utc)
    return t.astimezone(dt.timezone.utc).isoformat().replace("+00:00", "Z")


def _digest(e: ModelEntry) -> str:
    if e.digest:
        return e.digest.removeprefix("sha256:").removeprefix("sha256-")
    return hashlib.sha256(f"{e.launch.path}:{e.size}".encode()).hexdigest()


def _details(e: ModelEntry) -> dict[str, Any]:
    info = read_info(e.launch.path) if e.launch.path else None
    if info is None:
        return {"parent_model": "", "format": "gguf", "family": "", "families": None,
                "parameter_size": "", "quantization_level": ""}
    return gguf.details(info)


def _tag(e: ModelEntry) -> dict[str, Any]:
    return {"name": e.name, "model": e.name, "modified_at": _rfc3339(e.modified_at),
            "size": e.size, "digest": _digest(e), "details": _details(e),
            "routerd": {"source": e.source, "location": e.location,
                        "aliases": list(e.aliases)}}


async def tags(request: web.Request) -> web.Response:
    catalog = request.app[keys.CATALOG]
    # pulls, deletes and files on disk change between calls: rescan, in a thread (header
    # reads are cached)
    await catalog.refresh_async()
    models = []
    for e in catalog.entries():
        if e.replica_of or not model_visible(request, e.name):
            continue  # a local replica is listed as its model (its engine in /api/ps)
        tag = _tag(e)
        models.append(tag)
        for alias in e.aliases:  # every configured model by name and by alias
            models.append({**tag, "name": alias, "model": alias,
                           "routerd": {**tag["routerd"], "alias_of": e.name}})
    models.extend(peer_views.tags(request))  # marked with their peer (routerd/peers/)
    return jresp({"models": models})


async def ps(request: web.Request) -> web.Response:
    scheduler = request.app[keys.SCHEDULER]
    models = []
    over = scheduler.acct.over_booking()
    cached = scheduler.cache.cached_bytes(scheduler.config)  # saved prompt caches (issue 14)
    for r in scheduler.snapshot():
        if not model_visible(request, r.name):
            continue
        held = r.held
        vram = sum(v for k, v in held.items() if k.startswith("gpu"))
        expires = (dt.datetime.fromtimestamp(r.expires_at, dt.timezone.utc)
                   if r.expires_at else dt.datetime(2318, 1, 1, tzinfo=dt.timezone.utc))
        models.append({
            "name": r.name, "model": r.name, "size": sum(held.values()), "digest": _digest(r.entry),
            "details": _details(r.entry), "expires_at": _rfc3339(expires), "size_vram": vram,
            "context_length": r.ctx_size,
            "routerd": {"state": r.state.value, "pid": r.pid,
                        "backend": r.backend, "estimate": r.estimate,
                        "measured": r.measured, "booked": r.booked, "in_use": r.in_use,
                        "inflight": r.inflight, "parallel": r.parallel,
                        "load_seconds": round(r.load_seconds, 3),
                        "load_progress": scheduler.load_progress(r.name),
                        "gpu": _gpu_placement(r.entry.launch.placement),
                        "vram_over_booking": over.get(r.name),
                        "threads": r.entry.launch.threads,
                        "prompt_cache_bytes": cached.get(r.name, 0)}})
    failed = [{"name": n, "reason": scheduler.failed_reason(n)}
              for n in request.app[keys.CATALOG].names() if scheduler.failed_reason(n)]
    budget = scheduler.acct.budget()
    remote, peers = peer_views.ps(request)  # every host's loaded models (routerd/peers/)
    models.extend(remote)
    return jresp({"models": models,
                              "routerd": {"budget": budget, "failed": failed, "peers": peers,
                                          "queue": scheduler.waiting,
                                          "gpus": scheduler.acct.gpus(),
                                          "vram_over_booking": over,
                                          "prompt_cache_bytes": cached}})


def _gpu_placement(p: Any) -> dict[str, Any] | None:
    """Where the scheduler put the model (None: no GPU managed)."""
    if p is None:
        return None
    return {"gpu_layers": p.gpu_layers, "devices": list(p.devices),
            "tensor_split": list(p.tensor_split), "main_gpu": p.main_gpu}


def _parameters(options: dict[str, Any]) -> str:
    lines = []
    for k, v in options.items():
        for item in (v if isinstance(v, list) else [v]):
            lines.append(f"{k:<15} {json.dumps(item) if isinstance(item, str) else item}")
    return "\n".join(lines)


async def show(request: web.Request) -> web.Response:
    body = await read_json(request)
    name = body.get("model") or body.get("name")
    if not isinstance(name, str) or not name:
        raise BadRequest("model is required")
    note_request(request, name)
    entry = await request.app[keys.CATALOG].lookup(name)
    info = await asyncio.to_thread(read_info, entry.launch.path) if entry.launch.path else None
    verbose = bool(body.get("verbose"))
    model_info = await _model_info(entry.name, info, verbose) if info else {}
    template = entry.template or (info.chat_template if info else None) or ""
    modelfile = [f"# Modelfile generated by routerd for {entry.name}",
                 f"FROM {entry.launch.path or entry.location}"]
    if entry.system:
        modelfile.append(f'SYSTEM """{entry.system}"""')
    for line in _parameters(dict(entry.options)).splitlines():
        modelfile.append(f"PARAMETER {line}")
    caps = capabilities.of(entry, info)
    out = {"license": entry.license or "", "modelfile": "\n".join(modelfile) + "\n",
           "parameters": _parameters(dict(entry.options)), "template": template,
           "system": entry.system or "",
           "details": _details(entry),
           "model_info": model_info,
           "capabilities": caps, "modified_at": _rfc3339(entry.modified_at),
           "routerd": {"source": entry.source, "location": entry.location,
                       "backend": entry.launch.backend, "ctx_size": entry.launch.ctx_size,
                       "parallel": entry.launch.parallel, "aliases": list(entry.aliases)}}
    return jresp(out)


async def _model_info(name: str, info: gguf.GGUFInfo, verbose: bool) -> dict[str, Any]:
    """model_info; the verbose one (long arrays read in full) off the event loop."""
    if not verbose:
        return gguf.model_info(info)
    loop = asyncio.get_running_loop()
    gate = _VERBOSE_GATES.get(loop)
    if gate is None:
        gate = _VERBOSE_GATES[loop] = asyncio.Semaphore(1)
    async with gate:
        log.info("show.verbose_read", model=name, path=info.path)
        return await asyncio.to_thread(gguf.model_info, info, True)


async def version(request: web.Request) -> web.Response:
    return jresp({"version": OLLAMA_API_VERSION, "routerd": __version__})


async def root(request: web.Request) -> web.Response:
    return web.Response(text="Ollama is running")  # what Ollama clients probe for


async def logs(request: web.Request) -> web.StreamResponse:
    name = request.query.get("model")
    if not name:
        raise BadRequest("model is required (?model=NAME)")
    note_request(request, name)
    scheduler = request.app[keys.SCHEDULER]
    entry = request.app[keys.CATALOG].resolve(name)
    runner = scheduler.runners.get(entry.name)
    follow = request.query.get("follow") in ("1", "true", "yes")
    resp = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8"})
    await resp.prepare(request)
    if runner is None:
        for line in scheduler.last_logs.get(entry.name, ()):
            await resp.write(line.encode() + b"\n")
    elif follow:
        async for line in runner.worker.follow():
            await resp.write(line.encode() + b"\n")
    else:
        for line in list(runner.worker.lines):
            await resp.write(line.encode() + b"\n")
    await resp.write_eof()
    return resp


async def refresh(request: web.Request) -> web.Response:
    catalog = request.app[keys.CATALOG]
    await catalog.refresh_async()  # a rescan of every source: in a thread
    return jresp({"models": len(catalog.entries())})


async def metrics(request: web.Request) -> web.StreamResponse:
    m = request.app.get(keys.METRICS)
    if m is None:
        raise ModelNotFound("metrics are not enabled")
    from ..metrics import handle_metrics

    return await handle_metrics(request)


def add_routes(app: web.Application) -> None:
    for method, path, handler in (("GET", "/api/tags", tags), ("GET", "/api/ps", ps),
                                  ("POST", "/api/show", show), ("GET", "/api/version", version),
                                  ("GET", "/", root),  # GET routes answer HEAD too
                                  ("GET", "/metrics", metrics)):
        add_route(app, method, path, handler, dialect="ollama")
    # Worker output and rescans are the operator's (roles: admin keys only).
    add_route(app, "GET", "/api/logs", logs, dialect="ollama", admin=True)
    add_route(app, "POST", "/api/refresh", refresh, dialect="ollama", admin=True)
