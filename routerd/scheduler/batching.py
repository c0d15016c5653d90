"""Swap-aware queueing: how many requests for a loaded model may still go ahead of a load that
waits for that model's room (`swap_batch`), and `min_resident` against ping-pong.

When a load (model W) cannot fit because busy models hold the room, the scheduler puts a
`Gate` on each of those models (policy.blockers). Requests for a gated model that came before
W's load was asked are ahead of it in line and are served as usual. Later ones overtake W only
while `policy.may_overtake` allows: at most `swap_batch.requests` of them, within
`swap_batch.wait` of W's request. Then the gate closes: later requests step aside (they give
back their place and wait for W's load to end), the model's last requests finish, it goes idle,
W evicts it and loads; the requests that stepped aside then queue for their model's reload
like any others. So alternating clients cost one swap per batch, and W waits for at most
the requests ahead of it plus one bounded batch.

`min_resident`: a model whose load evicted W less than `min_resident` ago is not cut off for
W while it has requests (its gate stays open until then), nor evicted for W in the moment
between two requests (scheduler._view: idle for RESIDENT_GRACE_S, it may go).
"""

from __future__ import annotations

import asyncio
import collections
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import structlog

from ..config import SwapBatch
from . import policy

log = structlog.get_logger(__name__)


@dataclass(eq=False)
class Gate:
    """A loaded model (`runner`) that a waiting load (`contender`) needs gone."""

    runner: Any  # scheduler.Runner (not imported: the runner module sits beside this one)
    contender: str
    since: float  # when the contender's load was asked: its place in line
    requests: int
    wait: float
    resident_until: float
    overtaken: int = 0
    closed: bool = False
    done: asyncio.Event = field(default_factory=asyncio.Event)
    timer: asyncio.TimerHandle | None = None


class Batches:
    """The gates on loaded models, and who displaced whom when (for min_resident)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.gates: dict[Any, Gate] = {}  # runner -> its gate
        self._displaced: dict[tuple[str, str], float] = {}  # (newcomer, victim) -> when
        # While any load is queued: when the requests that took each runner's slots came,
        # so a gate made later counts those that overtook the load before it existed.
        self._recent: dict[Any, collections.deque[float]] = {}
        self.closed_total = 0  # batches cut off (for tests and the bench)

    # ------------------------------------------------------------------ the waiting load

    def displaced(self, newcomer: str, victims: list[str]) -> None:
        """`newcomer`'s load evicted `victims` now."""
        now = self.clock()
        for v in victims:
            self._displaced[(newcomer, v)] = now
        if len(self._displaced) > 1024:  # names come and go: keep the newest
            for key in sorted(self._displaced, key=self._displaced.__getitem__)[:512]:
                del self._displaced[key]

    def protects(self, name: str, contender: str, now: float, min_resident: float) -> bool:
        """Whether `name`'s load evicted `contender` less than `min_resident` ago."""
        evicted_at = self._displaced.get((name, contender))
        return evicted_at is not None and now < evicted_at + min_resident

    def contend(self, runner: Any, contender: str, since: float, batch: SwapBatch,
                min_resident: float) -> Gate:
        """Put a gate on `runner` for `contender` (the first contender keeps its place)."""
        gate = self.gates.get(runner)
        if gate is not None:
            return gate
        evicted_at = self._displaced.get((runner.name, contender))
        resident_until = evicted_at + min_resident if evicted_at is not None else -math.inf
        gate = Gate(runner, contender, since, batch.requests, batch.wait, resident_until)
        gate.overtaken = sum(1 for t in self._recent.get(runner, ()) if t > since)
        self.gates[runner] = gate
        log.info("scheduler.swap_waits", model=runner.name, waiting=contender,
                 batch=batch.requests, wait=batch.wait,
                 resident_for=max(0.0, resident_until - self.clock()))
        self._check(gate)
        return gate

    def end(self, contender: str, keep: Callable[[Any], bool] = lambda r: False) -> None:
        """`contender`'s wait for room is over (it loads, or gave up): open its gates."""
        for runner, gate in list(self.gates.items()):
            if gate.contender == contender and not keep(runner):
                self._open(gate)

    def prune(self, alive: Callable[[Any], bool]) -> None:
        """Open the gates of runners that are gone (evicted, crashed, expired)."""
        for runner, gate in list(self.gates.items()):
            if not alive(runner):
                self._open(gate)
        for runner in [r for r in self._recent if not alive(r)]:
            del self._recent[runner]

    def no_load_queued(self) -> None:
        self._recent.clear()

    def _open(self, gate: Gate) -> None:
        if self.gates.get(gate.runner) is gate:
            del self.gates[gate.runner]
        if gate.timer is not None:
            gate.timer.cancel()
            gate.timer = None
        gate.done.set()

    # ------------------------------------------------------------------ requests

    def held_back(self, runner: Any, arrived: float) -> Gate | None:
        """The closed gate a request for `runner` that arrived at `arrived` must wait on."""
        gate = self.gates.get(runner)
        if gate is None or not gate.closed or arrived <= gate.since:
            return None
        return gate

    def took_slot(self, runner: Any, arrived: float) -> Gate | None:
        """A request took a slot on `runner`: count it if it overtook a waiting load; the
        closed gate if it may not go ahead after all (it gives the slot back and waits)."""
        gate = self.gates.get(runner)
        if gate is None:
            seen = self._recent.get(runner)
            if seen is None:
                seen = self._recent[runner] = collections.deque(maxlen=256)
            seen.append(arrived)
            return None
        if arrived <= gate.since:
            return None
        if gate.closed:
            return gate
        gate.overtaken += 1
        self._check(gate)
        return None

    def _check(self, gate: Gate) -> None:
        """Close the gate once no further request may overtake; else arm a timer for the
        moment time alone would close it."""
        now = self.clock()
        if gate.timer is not None:
            gate.timer.cancel()
            gate.timer = None
        if not policy.may_overtake(gate.overtaken, gate.since, now, requests=gate.requests,
                                   wait=gate.wait, resident_until=gate.resident_until):
            gate.closed = True
            self.closed_total += 1
            log.info("scheduler.batch_closed", model=gate.runner.name, waiting=gate.contender,
                     overtaken=gate.overtaken)
            return
        at = [t for t in (gate.resident_until, gate.since + gate.wait) if now < t < math.inf]
        if at:
            loop = asyncio.get_running_loop()
            gate.timer = loop.call_later(min(at) - now + 1e-3, self._check, gate)
