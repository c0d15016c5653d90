"""The scheduler: leases, one bounded queue, loads serialised, eviction by real bytes.

`lease(model)` hands out a ready worker. A model already loaded never waits behind another
model's load; only loads are serialised. Every waiting request counts against `max_queue`,
including those waiting for a slot on a loaded model.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import time
from functools import partial
from typing import Any, AsyncIterator, Awaitable, Callable

import structlog

from ..catalog import Catalog, ModelEntry
from ..config import Config
from ..errors import (LoadOptionsFailed, ModelBusy, ModelFailed, ModelTooLarge, QueueFull,
                      RouterdError, ShuttingDown)
from ..events import EventSink, NullEvents
from ..metrics import Metrics, NullMetrics
from ..workers.process import Worker, WorkerLoadError
from ..workers.state import WorkerState
from . import policy, progress
from .accounting import Accountant
from .batching import Batches, Gate
from .cache import CacheKeeper
from .cpu import launch as cpu_launch
from .lifecycle import ModelState, RunnerSnapshot
from .runner import Runner
from .supervision import FailureTracker

log = structlog.get_logger(__name__)
LOAD_TICK_S = 1.0  # a load's progress event every so often
RESIDENT_GRACE_S = 1.0  # idle this long, a model within min_resident may go (see _view)

# Builds the worker for an entry; the scheduler passes the exit hook it wants called.
WorkerFactory = Callable[[ModelEntry, Callable[[Worker], None]], Worker]

__all__ = ["Runner", "Scheduler", "WorkerFactory"]


class Scheduler:
    def __init__(self, config: Config, catalog: Catalog, worker_factory: WorkerFactory,
                 accountant: Accountant, *, metrics: Metrics | None = None,
                 events: EventSink | None = None,
                 failures: FailureTracker | None = None,
                 cache: CacheKeeper | None = None) -> None:
        self.config, self.catalog, self._new_worker = config, catalog, worker_factory
        self.cache = cache or CacheKeeper(None, llama_server=None)  # prompt caches (cache.py)
        self.acct = accountant
        self.metrics: Metrics = metrics if metrics is not None else NullMetrics()
        self.events: EventSink = events if events is not None else NullEvents()
        self.failures = failures or FailureTracker()
        self.runners: dict[str, Runner] = {}
        # Evicted for the count limit alone, still exiting while the next model loads: their
        # memory counts until they are gone (see _make_room).
        self._stopping: dict[int, Runner] = {}
        self._loading: dict[str, asyncio.Task[Runner]] = {}
        self._load_lock = asyncio.Lock()
        self._changed = asyncio.Condition()
        self._room_waiters = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._measuring = False
        self.waiting = 0
        self.closing = False
        self.last_logs: dict[str, list[str]] = {}  # the last worker's output, per model
        self.batches = Batches()  # swap_batch and min_resident (batching.py)
        self._asked: dict[str, float] = {}  # when each queued load was asked (its place in line)
        self._load_waiters: dict[str, int] = {}  # requests waiting on each load
        self.load_times: dict[str, float] = {}  # last measured load seconds, per model

    # ------------------------------------------------------------------ leases

    @contextlib.asynccontextmanager
    async def lease(self, name: str, *, keep_alive: float | None = None,
                    entry: ModelEntry | None = None) -> AsyncIterator[Runner]:
        """A ready worker for `name`, held for the block (acquire ... release)."""
        runner = await self.acquire(name, keep_alive=keep_alive, entry=entry)
        try:
            yield runner
        finally:
            self.release(runner, keep_alive)

    async def acquire(self, name: str, *, keep_alive: float | None = None,
                      entry: ModelEntry | None = None) -> Runner:
        """A ready worker for `name` with one of its slots taken; every acquire is paired with
        one `release`. `entry` overrides the catalog's (load options such as Ollama's
        num_ctx); a loaded worker with other load options is reloaded when idle. The request
        path calls this pair directly: no context-manager machinery per request."""
        if self.closing:
            raise ShuttingDown("routerd is shutting down")
        entry = entry or self.catalog.resolve(name)
        self.failures.check(entry.name)
        if self.waiting >= self.config.max_queue:
            raise QueueFull(f"server busy: {self.waiting} requests already waiting "
                            f"(max_queue {self.config.max_queue}); retry later", retry_after=2)
        runner = None
        arrived = time.monotonic()
        self._set_waiting(+1)
        try:
            while True:
                runner = await self.ensure_loaded(entry, arrived)
                gate = self.batches.held_back(runner, arrived) if self.batches.gates else None
                if gate is not None:  # the batch that overtook a waiting load is full: wait for it
                    runner = None
                    await self._step_aside(gate)
                    continue
                runner.refs += 1
                if runner.timer:
                    runner.timer.cancel()
                    runner.timer, runner.expires_at = None, None
                await runner.slots.acquire()
                gate = (self.batches.took_slot(runner, arrived)
                        if self._asked or self.batches.gates else None)
                if gate is None:
                    break
                runner.slots.release()
                self._release(runner, None)
                runner = None
                await self._step_aside(gate)
        except BaseException:
            if runner is not None:
                self._release(runner, keep_alive)
            raise
        finally:
            self._set_waiting(-1)
        runner.worker.begin()
        return runner

    async def _step_aside(self, gate: Gate) -> None:
        """Wait for the load this request let go first (bounded: that load's wait for room
        and its start are each bounded by timeouts.load); then it queues again."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(gate.done.wait(), self.config.timeouts.load)

    def release(self, runner: Runner, keep_alive: float | None = None) -> None:
        """Give back what `acquire` took."""
        runner.worker.end()
        runner.slots.release()
        self._release(runner, keep_alive)

    def _set_waiting(self, delta: int) -> None:
        self.waiting += delta
        self.metrics.set_queue_depth(self.waiting)

    def _release(self, runner: Runner, keep_alive: float | None) -> None:
        runner.refs -= 1
        if runner.worker.ready:
            self.failures.healthy(runner.name)
        runner.last_used = time.monotonic()
        if keep_alive is not None:
            runner.keep_alive = keep_alive
        if runner.refs == 0 and self.runners.get(runner.name) is runner:
            self._arm_expiry(runner)
            self._remeasure(runner)
        if self._room_waiters:  # no task per request unless a load waits for room
            self._spawn(self._notify())

    def _remeasure(self, runner: Runner) -> None:
        """Workers grow as their context fills: re-measure when idle, at most every 5 s, off
        the event loop (it walks the process tree and writes the measurements file)."""
        now = time.monotonic()
        if now - runner.measured_at < 5.0 or not runner.worker.ready or self._measuring:
            return
        runner.measured_at = now
        self._measuring = True
        self._spawn(self._measure(runner))

    async def _measure(self, runner: Runner) -> None:
        try:
            held = await asyncio.to_thread(
                self.acct.measure, runner.entry, runner.worker, runner.estimate)
        finally:
            self._measuring = False
        if held and self.runners.get(runner.name) is runner:
            runner.measured = held
            runner.need = {k: max(v, runner.need.get(k, 0)) for k, v in held.items()}
            self._publish_memory(runner)

    def _arm_expiry(self, runner: Runner) -> None:
        if runner.timer:
            runner.timer.cancel()
            runner.timer = None
        if math.isinf(runner.keep_alive):
            runner.expires_at = None
            return
        runner.expires_at = time.time() + runner.keep_alive
        loop = asyncio.get_running_loop()
        runner.timer = loop.call_later(
            runner.keep_alive, lambda: self._spawn(self._expire(runner)))

    async def _expire(self, runner: Runner) -> None:
        if runner.refs == 0 and self.runners.get(runner.name) is runner:
            log.info("scheduler.expired", model=runner.name)
            await self._unload(runner, reason="keep_alive")

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def _wait_changed(self, timeout: float) -> None:
        self._room_waiters += 1
        try:
            async with self._changed:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), timeout)
        finally:
            self._room_waiters -= 1

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _move(self, runner: Runner, expected: ModelState | tuple[ModelState, ...],
              new: ModelState, **why: Any) -> bool:
        """Advance a runner along the model lifecycle; metrics and events follow."""
        if not runner.state.swap(expected, new):
            return False
        self.metrics.set_state(runner.name, new.value)
        self.events.publish("model.state", model=runner.name, state=new.value, **why)
        return True

    # ------------------------------------------------------------------ views

    def snapshot(self) -> list[RunnerSnapshot]:
        """Every runner in the books: loaded, loading, and those still stopping."""
        return [r.snapshot() for r in [*self.runners.values(), *self._stopping.values()]]

    def model_state(self, name: str) -> ModelState:
        runner = self.runners.get(name)
        if runner is not None:
            return runner.state.value
        if name in self._loading:
            return ModelState.LOADING
        if self.failures.reason(name) is not None:
            return ModelState.FAILED
        return ModelState.NOT_LOADED

    # ------------------------------------------------------------------ loading

    async def ensure_loaded(self, entry: ModelEntry, arrived: float | None = None) -> Runner:
        """A ready runner for `entry`, loading it if needed. `arrived`: when the request
        came, its place in line against loads that wait for room (batching.py)."""
        want = entry.launch.identity()
        for _ in range(3):  # a load with other load options may be in flight: then ours
            runner = self.runners.get(entry.name)
            if (runner is not None and runner.worker.ready
                    and runner.entry.launch.identity() == want):
                return runner
            task = self._loading.get(entry.name)
            if task is None:
                task = asyncio.get_running_loop().create_task(self._load(entry))
                self._loading[entry.name] = task
                self._asked[entry.name] = arrived or time.monotonic()
                task.add_done_callback(partial(self._loaded, entry.name))
                self._spawn(self._watch_load(entry.name, task))
            elif arrived is not None and entry.name in self._asked:
                self._asked[entry.name] = min(self._asked[entry.name], arrived)
            runner = await self._join_load(entry.name, task)
            if runner.entry.launch.identity() == want:
                return runner
        raise ModelFailed(f"model {entry.name!r} is being reloaded with other options by "
                          "concurrent requests; retry")

    async def _join_load(self, name: str, task: asyncio.Task[Runner]) -> Runner:
        """Wait for a model's load. Shielded: a client that leaves does not cancel a load that
        others wait on, nor one nobody waits on any more (the next client finds it ready,
        keep_alive then applies) unless `abort_unwanted_loads` is set."""
        self._load_waiters[name] = self._load_waiters.get(name, 0) + 1
        try:
            return await asyncio.shield(task)
        finally:
            left = self._load_waiters[name] = self._load_waiters.get(name, 1) - 1
            if left <= 0:
                self._load_waiters.pop(name, None)
            if (left <= 0 and self.config.abort_unwanted_loads and not task.done()
                    and self._loading.get(name) is task):
                log.info("scheduler.load_aborted", model=name, reason="no request waits")
                task.cancel()

    async def _watch_load(self, name: str, task: asyncio.Task[Runner]) -> None:
        """While a load runs: its progress on the event bus (`model.loading`) every second;
        once ready, its load time for the next progress estimate."""
        while not task.done():
            await asyncio.wait({task}, timeout=LOAD_TICK_S)
            at = self.load_progress(name)
            if at is not None and not task.done():
                self.events.publish("model.loading", model=name, progress=at,
                                    waiting=self._load_waiters.get(name, 0))
        if not task.cancelled() and task.exception() is None:
            seconds = task.result().worker.load_seconds
            if seconds > 0:
                self.load_times[name] = seconds

    def load_progress(self, name: str) -> float | None:
        """How far `name`'s load has come (0..0.99); None when no load of it is under way."""
        runner = self.runners.get(name)
        if runner is None and name not in self._loading:
            with contextlib.suppress(RouterdError):
                name = self.catalog.resolve(name).name
            runner = self.runners.get(name)
        if runner is not None and runner.state.value is ModelState.LOADING:
            w = runner.worker
            started = getattr(w, "started_at", 0.0)
            elapsed = time.monotonic() - started if started else 0.0
            expected = self.load_times.get(name) or None
            return progress.load_progress(list(w.lines)[-64:], elapsed, expected)
        if name in self._loading and runner is None:
            return 0.0  # queued: waiting for the load lock or for room
        return None

    def _loaded(self, name: str, _task: asyncio.Task[Runner]) -> None:
        self._loading.pop(name, None)
        self._asked.pop(name, None)
        if not self._asked:
            self.batches.no_load_queued()

    async def _load(self, entry: ModelEntry) -> Runner:
        current = self.runners.get(entry.name)
        if current is not None and current.entry.launch.identity() != entry.launch.identity():
            # Other load options (Ollama's num_ctx, num_gpu). Whether they can fit at all is
            # decided before anything stops; the engine is replaced only once idle (never
            # cut for another client's options), and the wait holds no lock, so loads of
            # other models go on meanwhile.
            self._needs(entry)
            await self._wait_idle(current)
            if self.runners.get(entry.name) is current:
                await self._unload(current, reason="load-options-changed")
        async with self._load_lock:
            current = self.runners.get(entry.name)
            if current is not None and current.entry.launch.identity() == entry.launch.identity() \
                    and current.worker.ready:
                return current
            if current is not None:  # another client's options got in first
                raise ModelBusy(f"model {entry.name!r} was just loaded with other load "
                                "options by another request; retry", retry_after=1)
            await self.failures.backoff(entry.name)
            need, estimate, budget = self._needs(entry)
            for attempt in (1, 2):
                await self._make_room(entry, need, budget)
                try:
                    return await self._start(entry, need, estimate)
                except WorkerLoadError as e:
                    if e.oom and attempt == 1 and self._idle_runners():
                        log.warning("scheduler.load_oom_retry", model=entry.name)
                        await self._evict(self._idle_runners(), reason="oom-retry")
                        continue
                    if self._own_options(entry):
                        self.failures.record(entry.name, e.message)
                        raise
                    # The request's own load options broke it: that request's error, not the
                    # model's failure state (the next request loads the configured engine).
                    log.warning("scheduler.load_options_failed", model=entry.name,
                                error=e.message[-500:])
                    raise LoadOptionsFailed(f"model {entry.name!r} failed to load with this "
                                            f"request's options: {e.message}") from None
        raise AssertionError("unreachable")

    def _needs(self, entry: ModelEntry) -> tuple[dict[str, int], dict[str, int], dict[str, int]]:
        """What the entry needs against the budget; ModelTooLarge when it can never fit."""
        # Placed against the other models' bookings (per GPU: where it goes, how many
        # layers); the accountant keeps the placement for the launch.
        others = [r.view() for r in self.runners.values() if r.name != entry.name]
        need, estimate = self.acct.need(entry, others, self._stopping_need())
        budget = self.acct.budget()
        if not policy.fits_at_all(need, budget):
            raise ModelTooLarge(f"model {entry.name!r} cannot be loaded: "
                                + policy.refusal_message(need, budget))
        return need, estimate, budget

    def _own_options(self, entry: ModelEntry) -> bool:
        """Whether `entry` is the catalog's own (no request changed its load options)."""
        try:
            return self.catalog.resolve(entry.name).launch.identity() == entry.launch.identity()
        except RouterdError:
            return True

    async def _wait_idle(self, runner: Runner) -> None:
        deadline = time.monotonic() + self.config.timeouts.load
        while runner.refs and self.runners.get(runner.name) is runner:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ModelBusy(f"model {runner.name!r} is busy with requests that use other "
                                "load options; retry when they finish", retry_after=2)
            await self._wait_changed(min(left, 1.0))

    async def _start(self, entry: ModelEntry, need: dict[str, int],
                     estimate: dict[str, int]) -> Runner:
        entry = self.acct.launch(entry)  # with its GPU placement (-ngl, devices, split)
        entry = cpu_launch(entry, [r.entry.launch for r in self.runners.values()], self.config)
        entry = self.cache.launch(entry, self.config)  # --slot-save-path (cache.py)
        worker = self._new_worker(entry, self.worker_exited)
        keep = entry.keep_alive if entry.keep_alive is not None else self.config.keep_alive
        runner = Runner(entry=entry, worker=worker, need=dict(need), estimate=dict(estimate),
                        slots=asyncio.Semaphore(entry.launch.parallel), keep_alive=keep)
        self.runners[entry.name] = runner
        self.metrics.set_state(entry.name, ModelState.LOADING.value)
        self.events.publish("model.state", model=entry.name, state=ModelState.LOADING.value,
                            booked=runner.need)
        try:
            await worker.start(self.config.timeouts.load)
            await self.cache.restore(runner, self.config)  # saved slots, before any request
        except BaseException as e:
            if self.runners.get(entry.name) is runner:
                del self.runners[entry.name]
            if isinstance(e, asyncio.CancelledError):
                self._move(runner, ModelState.LOADING, ModelState.STOPPING)
                self._move(runner, ModelState.STOPPING, ModelState.NOT_LOADED,
                           reason="load cancelled")
            else:
                self._move(runner, ModelState.LOADING, ModelState.FAILED,
                           reason=str(getattr(e, "message", e))[-500:])
            self._spawn(self._notify())
            raise
        self.metrics.inc_load(entry.name)
        measured = await asyncio.to_thread(self.acct.measure, entry, worker, estimate)
        if measured:
            runner.measured, runner.need = measured, dict(measured)
        self._move(runner, ModelState.LOADING, ModelState.READY,
                   load_seconds=round(worker.load_seconds, 3), booked=runner.need)
        self._arm_expiry(runner)  # a load with no request (preload, empty prompt) expires too
        self._publish_memory(runner)
        return runner

    def _idle_runners(self) -> list[Runner]:
        return [r for r in self.runners.values() if r.refs == 0 and r.worker.ready]

    async def _make_room(self, entry: ModelEntry, need: dict[str, int],
                         budget: dict[str, int]) -> None:
        """Evict idle models by cost until `entry` fits; while busy models hold the room, gate
        them (batching.py) and wait, bounded by timeouts.load; then a 503 to retry."""
        try:
            await self._find_room(entry, need, budget)
        finally:
            self.batches.end(entry.name)

    async def _find_room(self, entry: ModelEntry, need: dict[str, int],
                         budget: dict[str, int]) -> None:
        deadline = time.monotonic() + self.config.timeouts.load
        while True:
            asked = self._asked.get(entry.name, deadline - self.config.timeouts.load)
            others = [r for r in self.runners.values() if r.name != entry.name]
            now = time.monotonic()
            views = [self._view(r, entry.name, now) for r in others]
            reserved = self._stopping_need()
            victims = policy.choose_victims(need, views, budget, now=now,
                                            max_loaded=self.config.max_loaded, reserved=reserved)
            if victims is not None:
                if victims:
                    chosen = [self.runners[v.name] for v in victims]
                    self.batches.displaced(entry.name, [v.name for v in victims])
                    if policy.fits_alongside(need, views, budget, reserved):
                        # Only the count limit asks for room: the old engine exits while the
                        # new one loads (a swap saves the 15-25 ms an engine takes to stop).
                        self._evict_behind(chosen)
                    else:
                        await self._evict(chosen, reason="room")
                return
            left = deadline - time.monotonic()
            if left <= 0:  # it fits once they finish: busy, not too large
                raise ModelBusy(
                    f"model {entry.name!r} cannot be loaded now: busy models hold the memory "
                    f"({policy.refusal_message(need, budget)}); retry later", retry_after=2)
            self._gate_blockers(entry, need, views, budget, reserved, asked, now)
            await self._wait_changed(min(left, 1.0))  # a release or an unload may make room

    def _view(self, runner: Runner, contender: str, now: float) -> policy.Loaded:
        """The runner for the policy, as `contender`'s load sees it. Requests that waited for
        its load and have not taken it yet count as using it (a model just loaded for them is
        not evicted under them); so does a model that displaced `contender` less than
        min_resident ago and served a request within RESIDENT_GRACE_S: closed-loop clients
        leave it idle for a moment between two requests, which is no reason to swap back."""
        view = runner.view()
        waiting = self._load_waiters.get(runner.name, 0)
        if (not waiting and not view.in_use and now - view.last_used < RESIDENT_GRACE_S
                and self.batches.protects(runner.name, contender, now,
                                          self.config.min_resident)):
            waiting = 1
        return dataclasses.replace(view, in_use=view.in_use + waiting) if waiting else view

    def _gate_blockers(self, entry: ModelEntry, need: dict[str, int],
                       views: list[policy.Loaded], budget: dict[str, int],
                       reserved: dict[str, int], asked: float, now: float) -> None:
        """The busy models `entry` waits on take no more than one batch ahead of it."""
        self.batches.prune(lambda r: self.runners.get(r.name) is r)
        blocking = policy.blockers(need, views, budget, max_loaded=self.config.max_loaded,
                                   reserved=reserved, now=now)
        for v in blocking:
            runner = self.runners.get(v.name)
            if runner is not None:
                self.batches.contend(runner, entry.name, asked, self.config.swap_batch,
                                     self.config.min_resident)

    async def _evict(self, runners: list[Runner], *, reason: str) -> None:
        for r in runners:
            log.info("scheduler.evicted", model=r.name, reason=reason, held=r.need)
            self.metrics.inc_eviction(r.name)
            self.events.publish("model.evicted", model=r.name, reason=reason, held=r.need)
        await asyncio.gather(*(self._unload(r, reason=reason) for r in runners))
        await self.acct.wait_released([r.worker for r in runners],
                                      self.config.memory.release_timeout)

    def _stopping_need(self) -> dict[str, int]:
        held: dict[str, int] = {}
        for r in self._stopping.values():
            for res, n in r.need.items():
                held[res] = held.get(res, 0) + n
        return held

    def _evict_behind(self, runners: list[Runner]) -> None:
        """Evict without waiting for the exits; memory stays booked until each is gone."""
        for r in runners:
            log.info("scheduler.evicted", model=r.name, reason="room", held=r.need,
                     overlapped=True)
            self.metrics.inc_eviction(r.name)
            self.events.publish("model.evicted", model=r.name, reason="room", held=r.need)
            if self.runners.get(r.name) is r:
                del self.runners[r.name]
            self._stopping[id(r)] = r
            self._spawn(self._unload(r, reason="room"))

    async def _unload(self, runner: Runner, *, reason: str) -> None:
        """Stop a runner. It leaves the model's slot at once (a new load may start), but its
        memory stays booked (`_stopping`) until its engine has exited."""
        if runner.timer:
            runner.timer.cancel()
            runner.timer = None
        if self.runners.get(runner.name) is runner:
            del self.runners[runner.name]
        self._stopping[id(runner)] = runner
        try:
            await self._stop_runner(runner, reason)
        finally:
            self._stopping.pop(id(runner), None)
        await self._notify()

    async def _stop_runner(self, runner: Runner, reason: str) -> None:
        t = self.config.timeouts
        draining = ModelState.DRAINING if runner.worker.inflight else ModelState.STOPPING
        self._move(runner, (ModelState.READY, ModelState.LOADING), draining, reason=reason)
        await self.cache.save(runner, self.config)  # bounded: min(save_timeout, timeouts.stop)
        await runner.worker.stop(drain=t.drain, kill_after=t.stop,
                                 on_drained=lambda: self._move(
                                     runner, ModelState.DRAINING, ModelState.STOPPING))
        self.last_logs[runner.name] = list(runner.worker.lines)
        self._move(runner, ModelState.DRAINING, ModelState.STOPPING)
        self._move(runner, ModelState.STOPPING, ModelState.NOT_LOADED, reason=reason)
        self.metrics.unloaded(runner.name)  # counters stay monotonic
        log.info("scheduler.unloaded", model=runner.name, reason=reason)

    def _publish_memory(self, runner: Runner) -> None:
        for res, n in runner.need.items():
            self.metrics.set_memory(runner.name, res, n)
        for res, n in self.acct.over_booking().get(runner.name, {}).items():
            self.metrics.set_vram_over_booking(runner.name, res, n)
        self.events.publish("model.memory", model=runner.name, booked=runner.need,
                            measured=runner.measured, estimate=runner.estimate)

    # ------------------------------------------------------------------ control

    async def load(self, name: str, *, keep_alive: float | None = None,
                   entry: ModelEntry | None = None) -> Runner:
        """Load without a request (empty prompt, preload); arm its keep-alive."""
        async with self.lease(name, keep_alive=keep_alive, entry=entry) as runner:
            return runner

    async def unload(self, name: str) -> bool:
        """Ollama's keep_alive 0: unload once the model's requests in flight have finished
        (its streams are not cut); at once when it is idle."""
        runner = self.runners.get(name) or self.runners.get(self.catalog.resolve(name).name)
        if runner is None:
            return False
        await self.retire_when_idle(runner, reason="request")
        return True

    async def retire_when_idle(self, runner: Runner, *, reason: str) -> None:
        """The runner stops once its last request is released (keep_alive 0 from now on)."""
        runner.keep_alive = 0.0
        if runner.refs == 0 and self.runners.get(runner.name) is runner:
            await self._unload(runner, reason=reason)
        else:
            log.info("scheduler.unload_when_idle", model=runner.name, reason=reason,
                     in_use=runner.refs)

    def forget_model(self, name: str) -> bool:
        """A model deleted from the store: its runner (if loaded) takes no new requests (the
        catalog no longer names it) and stops once idle; the deleted file is then unmapped."""
        runner = self.runners.get(name)
        if runner is None:
            return False
        self._spawn(self.retire_when_idle(runner, reason="deleted"))
        return True

    async def retire(self, runner: Runner, *, restart: bool = False) -> None:
        """Config reload: the runner takes no new requests from now on; its in-flight
        requests finish (bounded by timeouts.drain) and the worker stops. With `restart` (its
        config changed), a worker with the new config starts only then, and requests for the
        model wait for that one: two copies never hold memory at once."""
        if self.runners.get(runner.name) is runner:
            del self.runners[runner.name]

        async def swap() -> Runner:
            try:
                await self._unload(runner, reason="config-changed")
            except asyncio.CancelledError:
                await runner.worker.kill()  # shutting down: nothing left to drain
                raise
            return await self._load(self.catalog.resolve(runner.name))

        task = self.load_in_background(runner.name, swap, why="config-changed") \
            if restart else None
        if task is None:
            await self._unload(runner, reason="config-changed" if restart else "config-removed")
        else:
            await asyncio.wait({task})

    def worker_exited(self, worker: Worker) -> None:
        """Worker on_exit callback: a crash (or a kill for hanging) frees the books, and the
        model is restarted in the background after its backoff; requests wait for that load.
        A model failing too often is marked failed instead (FailureTracker)."""
        runner = self.runners.get(worker.model)
        if runner is None or runner.worker is not worker:
            return
        if worker.state.value is WorkerState.FAILED:
            del self.runners[worker.model]
            self.last_logs[worker.model] = list(worker.lines)
            if runner.timer:
                runner.timer.cancel()
            reason = worker.failure or "engine exited"
            self.failures.record(worker.model, reason)
            self._move(runner, (ModelState.READY, ModelState.DRAINING, ModelState.STOPPING),
                       ModelState.FAILED, reason=reason[-500:], code=worker.returncode)
            self.metrics.inc_restart(worker.model)
            self.metrics.unloaded(worker.model)
            self._spawn(self._notify())
            if self.failures.reason(worker.model) is None:
                self.load_in_background(worker.model, lambda: self._load(runner.entry),
                                        why="worker-failed")

    def load_in_background(self, name: str, steps: Callable[[], Awaitable[Runner]], *,
                           why: str) -> asyncio.Task[Runner] | None:
        """Run `steps` as the model's one load: requests for `name` wait for it
        (`ensure_loaded` joins the task in `_loading`) instead of starting another. None if
        a load already runs."""
        if name in self._loading or self.closing:
            return None

        async def run() -> Runner:
            return await steps()

        task = asyncio.get_running_loop().create_task(run())
        self._loading[name] = task

        def done(t: asyncio.Task[Runner]) -> None:
            if self._loading.get(name) is t:
                del self._loading[name]
            if not t.cancelled() and t.exception() is not None:
                log.warning("worker.restart_failed", model=name, why=why,
                            error=str(t.exception()))

        task.add_done_callback(done)
        self._spawn(self._watch_load(name, task))
        log.info("worker.restarting", model=name, why=why)
        self.events.publish("model.restarting", model=name, why=why)
        return task

    async def kill_hung(self, runner: Runner, reason: str) -> None:
        """A worker that stopped answering: SIGKILL it; its exit restarts it (worker_exited)."""
        if self.runners.get(runner.name) is not runner:
            return
        log.warning("worker.hung", model=runner.name, pid=runner.worker.pid, reason=reason)
        runner.worker.failure = reason
        await runner.worker.kill()

    async def preload(self) -> None:
        entries = [e for e in self.catalog.entries() if e.preload]
        entries.sort(key=lambda e: sum(self.acct.need(e)[0].values()))
        for e in entries:
            try:
                await self.load(e.name)
            except Exception as exc:  # noqa: BLE001 - a preload failure must not stop the daemon
                log.error("scheduler.preload_failed", model=e.name, error=str(exc))

    async def close(self, deadline: float = 30.0) -> None:
        self.closing = True
        for task in list(self._loading.values()):
            task.cancel()
        runners = list(self.runners.values()) + list(self._stopping.values())
        t = self.config.timeouts
        await asyncio.gather(*(r.worker.stop(drain=min(deadline, t.drain), kill_after=t.stop)
                               for r in runners), return_exceptions=True)
        self.runners.clear()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def failed_reason(self, name: str) -> str | None:
        return self.failures.reason(name)
