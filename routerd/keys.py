"""Typed application state keys, shared by the app factory and the handlers.

The objects are set by make_app and its cleanup_ctx; the types come in under TYPE_CHECKING
so this module imports nothing at run time that imports it back.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web

from .config import Config

if TYPE_CHECKING:
    from .catalog import Catalog
    from .discovery import Discovery
    from .dispatch import Dispatcher
    from .events import EventBus
    from .metrics import Metrics
    from .peers.peers import Peers
    from .scheduler.scheduler import Scheduler
    from .store.store import Store

CONFIG = web.AppKey("config", Config)
SCHEDULER: web.AppKey[Scheduler] = web.AppKey("scheduler")
CATALOG: web.AppKey[Catalog] = web.AppKey("catalog")
STORE: web.AppKey[Store] = web.AppKey("store")
DISPATCHER: web.AppKey[Dispatcher[Any]] = web.AppKey("dispatcher")  # Runner or peer
HTTP = web.AppKey("http_session", aiohttp.ClientSession)
# A session that never reuses a connection: the retry after a stale pooled one failed.
HTTP_FRESH = web.AppKey("http_session_fresh", aiohttp.ClientSession)
METRICS: web.AppKey[Metrics] = web.AppKey("metrics")
EVENTS: web.AppKey[EventBus] = web.AppKey("events")
# The Discovery object (models other tools downloaded), when discovery is on.
DISCOVERER: web.AppKey[Discovery] = web.AppKey("discoverer")
# Ollama stores found on this machine (discovery), served read-only by the store.
OLLAMA_DIRS: web.AppKey[list[Path]] = web.AppKey("ollama_dirs", list)
# Other hosts whose models routerd serves (routerd/peers/).
PEERS: web.AppKey[Peers] = web.AppKey("peers")
