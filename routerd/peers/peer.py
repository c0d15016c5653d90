"""One peer: its poller (bounded interval, exponential backoff while down), its models, its
health and routerd's own count of requests in flight there.

Health: a poll that fails (refused, an error status, no answer within `timeout`) marks the
peer down at once, so "down" is known within `timeout` of a poll; a request that fails on it
(`check`) probes the port at once and marks it down too, so the next requests get a 503
without waiting for a poll. While down it is polled again after `backoff`, doubling up to
`interval`: a peer that comes back is served again within one `interval`, without a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import os
import time
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import structlog

from ..config import PeerConfig
from ..metrics import Metrics, NullMetrics
from . import kinds

log = structlog.get_logger(__name__)


def read_key(config: PeerConfig) -> str | None:
    if config.api_key_file:
        with open(os.path.expanduser(config.api_key_file), encoding="utf-8") as f:
            return f.read().strip() or None
    return config.api_key or None


class Peer:
    def __init__(self, config: PeerConfig, session: aiohttp.ClientSession,
                 metrics: Metrics | None = None) -> None:
        self.config, self.session = config, session
        self.metrics = metrics or NullMetrics()
        self.kind: str | None = None if config.kind == "auto" else config.kind
        self.api_root = config.url  # openai: the API root; else the server's base URL
        self.up = False
        self.error: str | None = "not polled yet"
        self.models: dict[str, kinds.RemoteModel] = {}  # the last list read (kept while down)
        self._exposed: dict[str, str] = {}  # exposed(), computed once per poll
        self.free = 0  # a routerd peer's unbooked memory, for "fits without evicting"
        self.budget: dict[str, Any] = {}
        self.latency: float | None = None  # seconds, the last poll's slowest request
        self.polled_at: float | None = None  # wall clock of the last good poll
        self.generation = 0  # good polls so far: liveness evidence for a waiting request
        self.inflight: dict[str, int] = {}  # remote model → requests routerd has there now
        self.retry_at = 0.0  # monotonic: when a down peer is polled next
        self._failures = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopped = False
        self._polled = asyncio.Event()  # set after each poll, good or bad
        try:
            key = read_key(config)
        except OSError as e:
            key, self.error = None, f"api_key_file: {e.strerror}"
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}

    @property
    def name(self) -> str:
        return self.config.name

    # ------------------------------------------------------------------ names

    def exposed(self) -> dict[str, str]:
        """routerd's name (prefix + the peer's) → the peer's, for the models the filter keeps
        (read on every request: computed when a poll sets `models`, not here)."""
        return self._exposed

    def _set_models(self, models: dict[str, kinds.RemoteModel]) -> None:
        keep = self.config.models
        self.models = models
        self._exposed = {self.config.prefix + n: n for n in models
                         if any(fnmatch.fnmatchcase(n, g) for g in keep)}

    def forward_url(self, path: str) -> str:
        return kinds.forward_url(self.kind or "openai", self.api_root, path)

    # ------------------------------------------------------------------ polling

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        self._stopped = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self.metrics.forget_peer(self.name)

    async def wait_polled(self, timeout: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._polled.wait(), timeout)

    async def _run(self) -> None:
        while not self._stopped:
            try:
                await self.poll()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - any failure is the peer's health
                self._failed(f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)
            self._polled.set()
            self._polled.clear()
            wait = self.config.interval
            if not self.up:
                wait = min(self.config.interval,
                           self.config.backoff * 2 ** max(0, self._failures - 1))
            self.retry_at = time.monotonic() + wait
            self._wake.clear()
            # asyncio.wait, not wait_for: 3.11's wait_for drops a cancel that arrives as the
            # event is set (a failed request's wake-up racing a stop), and the loop ran on.
            waiter = asyncio.ensure_future(self._wake.wait())
            try:
                await asyncio.wait({waiter}, timeout=wait)
            finally:
                waiter.cancel()

    async def _get(self, url: str) -> Any:
        timeout = aiohttp.ClientTimeout(total=self.config.timeout)
        async with self.session.get(url, headers=self.headers, timeout=timeout) as r:
            if r.status >= 400:
                raise PeerAnswer(f"GET {urlsplit(url).path} answered {r.status}")
            return await r.json(content_type=None)

    async def _try(self, url: str) -> Any:
        try:
            return await self._get(url)
        except (PeerAnswer, ValueError):
            return None

    async def _detect(self) -> None:
        url = self.config.url
        found = kinds.detect(await self._try(url + "/api/version"),
                             await self._try(url + "/props"))
        if found is None:
            for root in (url, url + "/v1"):  # an OpenAI API root, with or without /v1
                if kinds.read_models("openai", {"/models": await self._try(root + "/models")}):
                    found, self.api_root = "openai", root
                    break
        if found is None:
            raise PeerAnswer("kind not detected (no routerd, Ollama, llama-server or "
                             "OpenAI-compatible model list answered)")
        self.kind = found
        log.info("peer.detected", peer=self.name, kind=found, url=self.api_root)

    async def poll(self) -> None:
        t0 = time.monotonic()
        if self.kind is None:
            await self._detect()
        kind = self.kind
        assert kind is not None
        answers = {}
        for path in kinds.list_paths(kind):
            optional = path in ("/props", "/api/ps")
            answers[path] = await (self._try if optional else self._get)(self.api_root + path)
        self._set_models({m.name: m for m in kinds.read_models(kind, answers)})
        if kind == "routerd":
            self.free = kinds.budget_free(answers.get("/api/ps"))
            self.budget = dict(((answers.get("/api/ps") or {}).get("routerd") or {})
                               .get("budget") or {})
        self.latency = time.monotonic() - t0
        was_up = self.up
        self.up, self.error, self._failures = True, None, 0
        self.polled_at = time.time()
        self.generation += 1
        self.metrics.set_peer(self.name, up=True, latency=self.latency)
        if not was_up:
            log.info("peer.up", peer=self.name, kind=kind, models=len(self.models),
                     latency_ms=round(self.latency * 1000, 1))

    def _failed(self, reason: str) -> None:
        self._failures += 1
        self.mark_down(reason)

    def mark_down(self, reason: str) -> None:
        if self.up:
            log.warning("peer.down", peer=self.name, reason=reason)
        self.up, self.error = False, reason
        self.metrics.set_peer(self.name, up=False, latency=None)

    async def check(self, wait: float) -> bool:
        """After a request failed there: is the port still open? Marks the peer down (and
        polls it again soon) when not; a refused connection takes microseconds."""
        parts = urlsplit(self.config.url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_connection(parts.hostname, port), max(wait, 0.2))
        except (OSError, asyncio.TimeoutError) as e:
            self._failed(f"connection failed: {e or type(e).__name__}")
            self._wake.set()
            return False
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return True


class PeerAnswer(Exception):
    """The peer answered, but not what a poll needs."""
