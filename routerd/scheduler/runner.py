"""A Runner: one loaded (or loading) model in the scheduler's books.

It walks the model lifecycle (lifecycle.py) once, holds its worker, the bytes booked for it,
its slots and its keep-alive timer, and is the dispatcher's Target for a local engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from dataclasses import dataclass, field

import aiohttp

from ..catalog import ModelEntry
from ..workers.process import Worker
from ..workers.state import StateBox
from . import policy
from .lifecycle import TRANSITIONS, ModelState, RunnerSnapshot


def _lifecycle() -> StateBox[ModelState]:
    return StateBox(ModelState.LOADING, TRANSITIONS)


@dataclass(eq=False)
class Runner:
    entry: ModelEntry
    worker: Worker
    need: dict[str, int]
    estimate: dict[str, int]
    slots: asyncio.Semaphore
    keep_alive: float
    refs: int = 0  # leases held or waiting for a slot
    last_used: float = field(default_factory=time.monotonic)
    expires_at: float | None = None  # wall clock, for /api/ps
    timer: asyncio.TimerHandle | None = None
    measured: dict[str, int] | None = None
    measured_at: float = field(default_factory=time.monotonic)
    state: StateBox[ModelState] = field(default_factory=_lifecycle)

    @property
    def name(self) -> str:
        return self.entry.name

    def view(self) -> policy.Loaded:
        return policy.Loaded(name=self.name, need=self.need, in_use=self.refs,
                             last_used=self.last_used, pinned=math.isinf(self.keep_alive),
                             load_seconds=self.worker.load_seconds)

    def snapshot(self) -> RunnerSnapshot:
        w, launch = self.worker, self.entry.launch
        return RunnerSnapshot(
            name=self.name, state=self.state.value, pid=w.pid, backend=launch.backend,
            ctx_size=launch.ctx_size, parallel=launch.parallel, in_use=self.refs,
            inflight=w.inflight, estimate=dict(self.estimate),
            measured=dict(self.measured) if self.measured else None, booked=dict(self.need),
            expires_at=None if math.isinf(self.keep_alive) else self.expires_at,
            load_seconds=w.load_seconds, entry=self.entry)

    # The dispatcher's Target (routerd/dispatch.py): a local engine process.
    @property
    def base_url(self) -> str:
        return self.worker.base_url

    @property
    def auth_headers(self) -> dict[str, str]:
        return self.worker.auth_headers

    @property
    def alive(self) -> bool:
        return self.worker.alive

    def note_progress(self) -> None:
        self.worker.progress += 1

    async def activity(self, session: aiohttp.ClientSession, timeout: float) -> bytes | None:
        """What the engine's /slots says now (llama-server's per-slot progress: tokens
        decoded, prompt tokens processed); it changes while the engine works on a request.
        None when the engine does not answer it."""
        try:
            async with session.get(self.base_url + "/slots", headers=self.auth_headers,
                                   timeout=aiohttp.ClientTimeout(total=timeout)) as r:
                return await r.read() if r.status == 200 else None
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            return None

    async def exit_code(self, wait: float) -> int | None:
        if self.worker.alive:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.worker.exited(), wait)
        return self.worker.returncode
