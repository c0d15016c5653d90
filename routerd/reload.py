"""SIGHUP: reload the config. New models appear; removed ones drain and stop; changed ones
restart after their in-flight requests; unchanged models and their requests are untouched."""

from __future__ import annotations

import asyncio
import os
import warnings

import structlog
from aiohttp import web

from . import keys
from .config import ConfigError, load_config
from .sdnotify import notify

log = structlog.get_logger(__name__)


async def apply_reload(app: web.Application, path: str | None = None) -> bool:
    old = app[keys.CONFIG]
    notify("RELOADING=1")
    try:
        new = load_config(path or old.source or os.environ.get("ROUTERD_CONFIG"))
    except ConfigError as e:
        log.error("config.reload_failed", error=str(e))
        notify("READY=1")
        return False
    from dataclasses import replace

    new = replace(new, host=old.host, port=old.port)  # the socket stays as bound
    scheduler, catalog = app[keys.SCHEDULER], app[keys.CATALOG]
    before = {e.name: e for e in catalog.entries()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        app[keys.CONFIG] = new
    scheduler.config = new
    catalog.refresh(new)
    scheduler.failures.reset()
    after = {e.name: e for e in catalog.entries()}
    stale = []
    for name, runner in list(scheduler.runners.items()):
        entry = after.get(name)
        if entry is None or entry.launch.identity() != before[name].launch.identity():
            stale.append(runner)
    log.info("config.reloaded", added=sorted(set(after) - set(before)),
             removed=sorted(set(before) - set(after)), restarting=[r.name for r in stale])
    # Stopping drains each worker's in-flight requests first (bounded by timeouts.drain).
    await asyncio.gather(*(scheduler.retire(r) for r in stale), return_exceptions=True)
    notify("READY=1")
    return True
