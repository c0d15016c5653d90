"""The aiohttp application: make_app(config), state in AppKeys, lifecycles in cleanup_ctx."""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator, Callable, Iterable

import aiohttp
import structlog
from aiohttp import web

from . import keys
from .api import admin, anthropic, native, ollama, openai, rerank, responses
from .api import manage as store_routes
from .api import security, ui
from .activity import activity_middleware
from .api.common import MODEL_CHECK, MODEL_NAME, PERMISSION_CHECK, error_middleware
from .catalog import Catalog, ModelEntry
from .metrics import route_label
from .config import Config
from .dispatch import Dispatcher
from .events import EventBus
from .peers.peers import Peers
from .peers.router import Router
from .scheduler.accounting import Accountant
from .scheduler.cache import CacheKeeper
from .scheduler.scheduler import Scheduler
from .scheduler.supervision import Prober
from .workers.backends import find_llama_server
from .workers.factory import WorkerFactory
from .workers.registry import WorkerRegistry

log = structlog.get_logger(__name__)

ACCOUNTANT: web.AppKey[Accountant] = web.AppKey("accountant", Accountant)
DISCOVERY: web.AppKey[Callable[[], Iterable[ModelEntry]]] = web.AppKey("discovery")


async def discovery_context(app: web.Application) -> AsyncIterator[None]:
    """Models other tools downloaded: found at start (and on refresh), read only."""
    if DISCOVERY not in app:
        from .discovery import Discovery

        config = app[keys.CONFIG]
        discovery = Discovery(config)
        llama_server = find_llama_server(config.engines.llama_server)
        app[keys.OLLAMA_DIRS] = discovery.ollama_dirs()
        app[keys.DISCOVERER] = discovery
        app[DISCOVERY] = lambda: discovery.entries(llama_server)
    yield


async def http_context(app: web.Application) -> AsyncIterator[None]:
    """One pooled client session for every worker; no per-request setup."""
    # llama-server (cpp-httplib) closes a keep-alive connection idle for 5 s: drop ours at 4 s
    # so a request never goes out on a connection the engine is closing.
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=4, enable_cleanup_closed=True)
    session = aiohttp.ClientSession(connector=connector, auto_decompress=False)
    fresh = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=True),
                                  auto_decompress=False)
    app[keys.HTTP], app[keys.HTTP_FRESH] = session, fresh
    yield
    await session.close()
    await fresh.close()


async def scheduler_context(app: web.Application) -> AsyncIterator[None]:
    config = app[keys.CONFIG]
    session = app[keys.HTTP]
    llama_server = find_llama_server(config.engines.llama_server)
    catalog = Catalog(config, store=app.get(keys.STORE), llama_server=llama_server,
                      discovered=app.get(DISCOVERY))
    accountant = app.get(ACCOUNTANT) or Accountant(config)
    registry = WorkerRegistry(config.expand(config.state_dir) / "workers.json")
    new_worker = WorkerFactory(session, registry, llama_server=llama_server)
    scheduler = Scheduler(config, catalog, new_worker, accountant,
                          metrics=app.get(keys.METRICS), events=app.get(keys.EVENTS),
                          cache=CacheKeeper(session, llama_server=llama_server))
    app[keys.CATALOG], app[keys.SCHEDULER] = catalog, scheduler
    peers = Peers(config.peers, session, app.get(keys.METRICS))
    app[keys.PEERS] = peers
    catalog.remote = peers.entry  # names no local source has
    app[keys.DISPATCHER] = Dispatcher(Router(scheduler, peers), session, app[keys.HTTP_FRESH],
                                      idle_timeout=config.timeouts.request_idle)
    peers.start()
    for resource, n in accountant.budget().items():
        scheduler.metrics.set_budget(resource, n)
    prober = Prober(scheduler, session, interval=config.timeouts.probe_interval,
                    timeout=config.timeouts.probe_timeout)
    prober.start()
    preload = asyncio.get_running_loop().create_task(scheduler.preload())
    log.info("routerd.models", count=len(catalog.entries()), llama_server=llama_server,
             budget=accountant.budget())
    yield
    preload.cancel()
    await asyncio.gather(preload, return_exceptions=True)
    await prober.stop()
    await peers.close()
    await scheduler.close(config.timeouts.drain)
    await catalog.close()  # a rescan still in its thread


async def metrics_context(app: web.Application) -> AsyncIterator[None]:
    from .metrics import Metrics

    app[keys.METRICS] = Metrics()
    app[security.GUARD].metrics = app[keys.METRICS]
    yield


@web.middleware
async def metrics_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    status = 500
    try:
        resp = await handler(request)
        status = resp.status
        return resp
    except web.HTTPException as e:
        status = e.status
        raise
    finally:
        m = request.app.get(keys.METRICS)
        if m is not None:
            # Only names routerd knows become label values (a 404 must not mint a series).
            model = request.get(MODEL_NAME, "") if status != 404 else ""
            m.observe_request(route_label(request), model, status, loop.time() - t0)


def make_app(config: Config, *, accountant: Accountant | None = None,
             discovery: Callable[[], Iterable[ModelEntry]] | None = None) -> web.Application:
    guard = security.Guard(config)
    app = web.Application(
        middlewares=[error_middleware, *security.security_middlewares(guard),
                     metrics_middleware, activity_middleware],
        client_max_size=security.client_max_size(config))
    app[keys.CONFIG] = config
    app[security.GUARD] = guard
    app[keys.EVENTS] = EventBus()
    app[MODEL_CHECK] = security.check_model_allowed
    app[PERMISSION_CHECK] = security.check_permission
    if accountant is not None:
        app[ACCOUNTANT] = accountant
    if discovery is not None:
        app[DISCOVERY] = discovery
    app.cleanup_ctx.extend([metrics_context, discovery_context, http_context,
                            store_routes.store_context, scheduler_context])
    ollama.add_routes(app)
    openai.add_routes(app)
    anthropic.add_routes(app)
    responses.add_routes(app)
    rerank.add_routes(app)
    native.add_routes(app)
    admin.add_routes(app)
    store_routes.add_routes(app)
    ui.add_routes(app)  # /ui/, /api/ui/*, /api/events; its context runs after the scheduler's
    app.on_response_prepare.append(security.cors_response_hook(guard))
    security.warn_if_exposed(config, guard.keyring, log)
    return app
