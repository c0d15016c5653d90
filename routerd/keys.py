"""Typed application state keys, shared by the app factory and the handlers."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from .config import Config

CONFIG = web.AppKey("config", Config)
# The objects below are set by make_app's cleanup_ctx; typed loosely here to avoid import cycles.
SCHEDULER: web.AppKey[Any] = web.AppKey("scheduler", object)
CATALOG: web.AppKey[Any] = web.AppKey("catalog", object)
STORE: web.AppKey[Any] = web.AppKey("store", object)
HTTP: web.AppKey[Any] = web.AppKey("http_session", object)
# A session that never reuses a connection: the retry after a stale pooled one failed.
HTTP_FRESH: web.AppKey[Any] = web.AppKey("http_session_fresh", object)
METRICS: web.AppKey[Any] = web.AppKey("metrics", object)
# The Discovery object (models other tools downloaded), when discovery is on.
DISCOVERER: web.AppKey[Any] = web.AppKey("discoverer", object)
# Ollama stores found on this machine (discovery), served read-only by the store.
OLLAMA_DIRS: web.AppKey[list[Any]] = web.AppKey("ollama_dirs", list)
