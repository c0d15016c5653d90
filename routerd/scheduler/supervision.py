"""Crash-loop bookkeeping and liveness probes.

A model whose worker keeps failing backs off exponentially (capped) between attempts; after
`limit` consecutive failures it is marked failed and requests get the last reason at once until
the cool-off passes (or the config is reloaded / the model is stopped by hand).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import aiohttp
import structlog

from ..errors import ModelFailed

if TYPE_CHECKING:
    from .runner import Runner
    from .scheduler import Scheduler

log = structlog.get_logger(__name__)


@dataclass
class _Record:
    count: int = 0
    last: float = 0.0
    reason: str = ""


class FailureTracker:
    def __init__(self, *, limit: int = 3, base: float = 0.5, cap: float = 30.0,
                 cool_off: float = 60.0, clock=time.monotonic) -> None:
        self.limit, self.base, self.cap, self.cool_off = limit, base, cap, cool_off
        self._clock = clock
        self._records: dict[str, _Record] = {}

    def record(self, name: str, reason: str) -> None:
        r = self._records.setdefault(name, _Record())
        r.count += 1
        r.last = self._clock()
        r.reason = reason
        log.warning("worker.failure", model=name, count=r.count, reason=reason[-500:])

    # A successful load does not clear the count (a crash soon after still counts);
    # `healthy`, called when a request completes, does.
    def healthy(self, name: str) -> None:
        self._records.pop(name, None)

    def reset(self, name: str | None = None) -> None:
        if name is None:
            self._records.clear()
        else:
            self._records.pop(name, None)

    def delay(self, name: str) -> float:
        r = self._records.get(name)
        if r is None or r.count == 0:
            return 0.0
        wait = min(self.base * 2 ** (r.count - 1), self.cap)
        return max(0.0, r.last + wait - self._clock())

    def reason(self, name: str) -> str | None:
        r = self._records.get(name)
        if r is None or r.count < self.limit:
            return None
        if self._clock() - r.last > self.cool_off:
            return None
        return r.reason

    def check(self, name: str) -> None:
        reason = self.reason(name)
        if reason is not None:
            r = self._records[name]
            raise ModelFailed(f"model {name!r} is failing ({r.count} failures in a row); "
                              f"last error: {reason}")

    async def backoff(self, name: str) -> None:
        self.check(name)
        wait = self.delay(name)
        if wait > 0:
            log.info("worker.backoff", model=name, seconds=round(wait, 3))
            await asyncio.sleep(wait)


class Prober:
    """Liveness after ready: GET /health on an interval; no answer in time → kill.

    Unless the worker relayed output while its probe was out: an engine streaming tokens is
    alive, however late its /health answer (a single-threaded engine busy opening hundreds
    of streams missed one probe in the bench, and killing it cut 459 live streams). A hung
    engine sends nothing, so it is still killed on its first missed probe."""

    def __init__(self, scheduler: Scheduler, session: aiohttp.ClientSession, *,
                 interval: float, timeout: float) -> None:
        self.scheduler, self.session = scheduler, session
        self.interval, self.timeout = interval, timeout
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            runners = [r for r in self.scheduler.runners.values() if r.worker.ready]
            if runners:
                await asyncio.gather(*(self._probe(r) for r in runners))

    async def _probe(self, runner: Runner) -> None:
        worker = runner.worker
        before = worker.progress
        reason = await self.check(runner)
        if reason and worker.progress != before:
            log.warning("worker.probe_missed", model=runner.name, pid=worker.pid, reason=reason,
                        inflight=worker.inflight, note="output flowed meanwhile: not killed")
            return
        if reason:
            await self.scheduler.kill_hung(runner, reason)

    async def check(self, runner: Runner) -> str | None:
        w = runner.worker
        try:
            async with self.session.get(f"{w.base_url}/health",
                                        timeout=aiohttp.ClientTimeout(total=self.timeout)) as r:
                if r.status >= 500:
                    return f"health check answered {r.status}"
        except (asyncio.TimeoutError, aiohttp.ClientError, OSError) as e:
            return f"health check failed: {type(e).__name__} after {self.timeout}s"
        return None


