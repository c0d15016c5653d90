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


async def test_unloading_a_busy_model_drains_first() -> None:
    s, _ = make({"a": GB})
    rec = with_events(s)
    runner = await s.acquire("a")
    unload = asyncio.ensure_future(s.unload("a"))
    await asyncio.sleep(0.01)
    assert rec.states("a")[-1] == "draining" and runner.state.value is ModelState.DRAINING
    s.release(runner)
    await unload
    assert rec.states("a") == ["loading", "ready", "draining", "stopping", "not_loaded"]


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
