"""A model's lifecycle in the scheduler: the states it walks, the events and the snapshot
that show it, and the crash path — against the fake workers of test_scheduler."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from routerd.scheduler.lifecycle import TRANSITIONS, ModelState
from routerd.workers.state import InvalidTransition, StateBox, WorkerState
from tests.scheduler.test_scheduler import GB, FakeBooks, make, use

pytestmark = pytest.mark.timeout(20)


class Recorder:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def publish(self, type: str, **fields: Any) -> None:
        self.events.append({"type": type, **fields})

    def states(self, model: str) -> list[str]:
        return [e["state"] for e in self.events
                if e["type"] == "model.state" and e["model"] == model]


def with_events(s: Any) -> Recorder:
    rec = Recorder()
    s.events = rec
    return rec


async def test_load_serve_unload_walks_the_table_and_publishes_each_state() -> None:
    s, _ = make({"a": GB})
    rec = with_events(s)
    assert s.model_state("a") is ModelState.NOT_LOADED
    await use(s, "a")
    assert s.model_state("a") is ModelState.READY
    [snap] = s.snapshot()
    assert (snap.name, snap.state, snap.booked, snap.in_use) == ("a", ModelState.READY,
                                                                 {"ram": GB}, 0)
    assert await s.unload("a")
    assert s.model_state("a") is ModelState.NOT_LOADED and s.snapshot() == []
    assert rec.states("a") == ["loading", "ready", "stopping", "not_loaded"]
    assert rec.events[-1]["reason"] == "request"


async def test_retiring_a_busy_model_drains_first() -> None:
    s, _ = make({"a": GB})
    rec = with_events(s)
    runner = await s.acquire("a")
    retire = asyncio.ensure_future(s.retire(runner))
    await asyncio.sleep(0.01)
    assert rec.states("a")[-1] == "draining" and runner.state.value is ModelState.DRAINING
    s.release(runner)
    await retire
    assert rec.states("a") == ["loading", "ready", "draining", "stopping", "not_loaded"]


async def test_keep_alive_zero_on_a_busy_model_waits_for_its_requests() -> None:
    """Finding 9: the stream in flight is not cut, and no second engine loads meanwhile
    (the runner stays in the books until its engine is gone)."""
    s, log = make({"a": GB}, budget=GB + GB // 2, parallel=2)
    runner = await s.acquire("a")
    assert await s.unload("a")
    assert s.runners["a"] is runner and runner.state.value is ModelState.READY
    other = await s.acquire("a")  # a second request joins the same engine
    assert other is runner and log.count(("start", "a")) == 1
    s.release(other)
    s.release(runner)
    for _ in range(100):
        if "a" not in s.runners and not s.snapshot():
            break
        await asyncio.sleep(0.01)
    assert runner.state.value is ModelState.NOT_LOADED and log.count(("stop", "a")) == 1


async def test_a_stopping_engine_keeps_its_memory_booked() -> None:
    s, log = make({"a": GB, "b": GB}, budget=GB + GB // 2,
                  worker_kwargs={"a": {"stop_delay": 0.2}})
    await use(s, "a")
    unload = asyncio.ensure_future(s.unload("a"))
    await asyncio.sleep(0.05)
    assert "a" not in s.runners and [r.name for r in s.snapshot()] == ["a"]
    await use(s, "b")  # waits for a's exit: both never held memory at once
    assert log.index(("stopped", "a")) < log.index(("start", "b"))
    await unload


async def test_a_crash_marks_the_runner_failed_and_a_new_runner_loads() -> None:
    s, log = make({"a": GB})
    rec = with_events(s)
    await use(s, "a")
    first = s.runners["a"]
    await first.worker.kill()
    s.worker_exited(first.worker)  # what the worker's on_exit hook calls
    assert first.state.value is ModelState.FAILED
    assert s.model_state("a") is ModelState.LOADING  # restarted in the background
    await use(s, "a")
    assert s.runners["a"] is not first and log.count(("start", "a")) == 2
    assert rec.states("a") == ["loading", "ready", "failed", "loading", "ready"]
    assert any(e["type"] == "model.restarting" for e in rec.events)


async def test_a_failed_load_leaves_the_runner_failed() -> None:
    from routerd.workers.process import WorkerLoadError

    s, _ = make({"a": GB}, worker_kwargs={"a": {"fail": WorkerLoadError("boom")}})
    rec = with_events(s)
    with pytest.raises(WorkerLoadError):
        await use(s, "a")
    assert rec.states("a") == ["loading", "failed"]


def test_the_table_refuses_moves_it_lacks() -> None:
    box: StateBox[ModelState] = StateBox(ModelState.LOADING, TRANSITIONS)
    with pytest.raises(InvalidTransition):
        box.swap(ModelState.LOADING, ModelState.NOT_LOADED)
    assert box.swap(ModelState.LOADING, ModelState.READY)
    assert not box.swap(ModelState.LOADING, ModelState.READY)  # not from LOADING any more
    assert TRANSITIONS[ModelState.FAILED] == frozenset()
    workers: StateBox[WorkerState] = StateBox(WorkerState.STOPPED)
    with pytest.raises(InvalidTransition):
        workers.swap(WorkerState.STOPPED, WorkerState.READY)


class ThreadCheckingBooks(FakeBooks):
    def __init__(self, *a: Any) -> None:
        super().__init__(*a)
        self.threads: list[bool] = []

    def measure(self, entry: Any, worker: Any, estimate: Any) -> Any:
        self.threads.append(threading.current_thread() is threading.main_thread())
        return None


async def test_measuring_runs_off_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """Measuring walks the process tree and writes the measurements file: never on the
    loop (the request path called it from release)."""
    s, _ = make({"a": GB})
    books = ThreadCheckingBooks({"a": GB}, 24 * GB)
    s.acct = books  # type: ignore[assignment]
    await use(s, "a")
    runner = s.runners["a"]
    runner.measured_at -= 10  # due for a re-measure on the next release
    await use(s, "a")
    for _ in range(100):
        if len(books.threads) >= 2:
            break
        await asyncio.sleep(0.01)
    assert books.threads == [False, False]


class CtxBooks(FakeBooks):
    """Needs grow with the context, as the KV cache does."""

    def need(self, entry: Any, *rest: Any) -> tuple[dict[str, int], dict[str, int]]:
        n = {"ram": self.sizes.get(entry.name, GB) * entry.launch.ctx_size // 4096}
        return n, dict(n)


def options_entry(s: Any, name: str, ctx: int) -> Any:
    from routerd.catalog import with_load_options

    return with_load_options(s.catalog.resolve(name), {"num_ctx": ctx})


async def test_options_that_can_never_fit_are_refused_before_anything_stops() -> None:
    """Finding 6: num_ctx far beyond the budget is a 507 while the loaded engine serves on."""
    s, log = make({"a": GB}, budget=4 * GB)
    s.acct = CtxBooks({"a": GB}, 4 * GB)  # type: ignore[assignment]
    await use(s, "a")
    from routerd.errors import ModelTooLarge

    with pytest.raises(ModelTooLarge):
        await s.acquire("a", entry=options_entry(s, "a", 4096 * 64))
    assert log.count(("stop", "a")) == 0 and s.model_state("a") is ModelState.READY


async def test_a_busy_engine_is_not_cut_for_other_options_and_other_loads_go_on() -> None:
    """Finding 8: a reload for other options waits for the busy engine without holding the
    load lock (another model loads meanwhile), and replaces it only once idle."""
    s, log = make({"a": GB, "b": GB}, parallel=2)
    busy = await s.acquire("a")
    reload = asyncio.ensure_future(s.acquire("a", entry=options_entry(s, "a", 8192)))
    await asyncio.sleep(0.02)
    await asyncio.wait_for(use(s, "b"), 2)  # not stuck behind a's drain
    assert not reload.done() and log.count(("stop", "a")) == 0
    s.release(busy)
    runner = await asyncio.wait_for(reload, 5)
    assert runner.entry.launch.ctx_size == 8192 and log.count(("start", "a")) == 2
    s.release(runner)


async def test_a_load_that_fails_on_a_requests_options_is_that_requests_error() -> None:
    """Finding 7: the model is not marked failing for everyone."""
    from routerd.errors import LoadOptionsFailed
    from routerd.workers.process import WorkerLoadError
    from tests.scheduler.test_scheduler import FakeWorker

    s, log = make({"a": GB})
    plain = s._new_worker

    def factory(entry: Any, on_exit: Any) -> Any:
        if entry.launch.ctx_size == 999:
            return FakeWorker(entry.name, log, fail=WorkerLoadError("bad -c"))
        return plain(entry, on_exit)

    s._new_worker = factory
    for _ in range(3):
        with pytest.raises(LoadOptionsFailed):
            await s.acquire("a", entry=options_entry(s, "a", 999))
    assert s.failed_reason("a") is None
    await use(s, "a")  # the configured engine loads at once, no backoff
    assert s.model_state("a") is ModelState.READY
