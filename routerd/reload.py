"""SIGHUP: reload the config. New models appear; removed ones drain and stop; changed ones
restart after their in-flight requests; unchanged models and their requests are untouched.

Reloads are serialised (a second SIGHUP waits for the first's config swap), and a config that
does not load changes nothing.
"""

from __future__ import annotations

import asyncio
import os
import warnings
from dataclasses import replace
from typing import Any

import structlog
from aiohttp import web

from . import keys
from .api.security import GUARD
from .config import ConfigError, load_config
from .sdnotify import notify

log = structlog.get_logger(__name__)

RELOAD_LOCK: web.AppKey[asyncio.Lock] = web.AppKey("reload_lock", asyncio.Lock)


async def apply_reload(app: web.Application, path: str | None = None) -> bool:
    lock = app.get(RELOAD_LOCK)
    if lock is None:
        lock = asyncio.Lock()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # set after startup, on purpose
            app[RELOAD_LOCK] = lock
    async with lock:
        notify("RELOADING=1")
        try:
            swapped = _swap_config(app, path)
        except Exception as e:  # noqa: BLE001 - whatever went wrong, systemd hears READY again
            log.error("config.reload_failed", error=f"{type(e).__name__}: {e}")
            swapped = None
        finally:
            notify("READY=1")
        if swapped is None:
            return False
    retiring, added = swapped
    # Outside the lock: draining may take timeouts.drain; the next reload need not wait.
    scheduler = app[keys.SCHEDULER]
    preload = [e.name for e in app[keys.CATALOG].entries() if e.preload and e.name in added]
    results = await asyncio.gather(
        *(scheduler.retire(r, restart=restart) for r, restart in retiring),
        *(scheduler.load(name) for name in preload), return_exceptions=True)
    for result in results:
        if isinstance(result, Exception):
            log.error("config.reload_step_failed", error=str(result))
    return True


def _swap_config(app: web.Application,
                 path: str | None) -> tuple[list[tuple[Any, bool]], set[str]] | None:
    """Load and install the new config. Returns the runners to retire, each with whether its
    model is still configured (then it restarts with the new settings), and the names added."""
    old = app[keys.CONFIG]
    try:
        new = load_config(path or old.source or os.environ.get("ROUTERD_CONFIG"))
        new = replace(new, host=old.host, port=old.port)  # the socket stays as bound
        # The keys file, Host/CORS checks and body cap: a keys file that does not load fails
        # the whole reload (a revoked key must not live on because its file had a typo).
        app[GUARD].reload(new)
    except ConfigError as e:
        log.error("config.reload_failed", error=str(e))
        return None
    scheduler, catalog = app[keys.SCHEDULER], app[keys.CATALOG]
    before = {e.name: e for e in catalog.entries()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        app[keys.CONFIG] = new
    scheduler.config = new
    scheduler.acct.config = new  # the memory budget is re-read from the new config
    for resource, n in scheduler.acct.budget().items():
        scheduler.metrics.set_budget(resource, n)
    discoverer = app.get(keys.DISCOVERER)
    if discoverer is not None:
        discoverer.config = new  # model_dirs and the source toggles are read at each scan
    catalog.refresh(new)
    if keys.PEERS in app:
        app[keys.PEERS].reconfigure(new.peers)  # routerd/peers/: added, changed, removed
    scheduler.failures.reset()
    after = {e.name: e for e in catalog.entries()}
    retiring = []
    for name, runner in list(scheduler.runners.items()):
        entry, was = after.get(name), before.get(name, runner.entry)
        if entry is None or entry.launch.identity() != was.launch.identity():
            retiring.append((runner, entry is not None))
    log.info("config.reloaded", added=sorted(set(after) - set(before)),
             removed=sorted(set(before) - set(after)),
             restarting=[r.name for r, again in retiring if again],
             stopping=[r.name for r, again in retiring if not again],
             api_keys=len(app[GUARD].keyring or ()), budget=scheduler.acct.budget())
    return retiring, set(after) - set(before)
