"""The scheduler against fake workers and fake books (no processes; milliseconds each),
the way Ollama's sched_test fakes a 24 GB GPU."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import pytest

from routerd.catalog import Catalog, ModelEntry
from routerd.config import parse_config
from routerd.errors import ModelFailed, ModelNotFound, ModelTooLarge, QueueFull
from routerd.scheduler.scheduler import Scheduler
from routerd.scheduler.supervision import FailureTracker
from routerd.workers.process import WorkerLoadError
from routerd.workers.state import StateBox, WorkerState

GB = 1024**3
pytestmark = pytest.mark.timeout(20)


class FakeWorker:
    def __init__(self, model: str, log: list[tuple[str, str]], *, start_delay: float = 0,
                 fail: WorkerLoadError | None = None, stop_delay: float = 0) -> None:
        self.model, self._log = model, log
        self.state: StateBox[WorkerState] = StateBox(WorkerState.STOPPED)
        self.inflight = 0
        self.pid = 1000 + len(log)
        self.lines: list[str] = []
        self.failure: str | None = None
        self.returncode: int | None = None
        self.load_seconds = 0.0
        self.start_delay, self.fail, self.stop_delay = start_delay, fail, stop_delay
        self.released = asyncio.Event()

    ready = property(lambda self: self.state.value is WorkerState.READY)

    async def start(self, timeout: float) -> None:
        self.state.swap(WorkerState.STOPPED, WorkerState.STARTING)
        self._log.append(("start", self.model))
        await asyncio.sleep(self.start_delay)
        if self.fail:
            self.state.swap(WorkerState.STARTING, WorkerState.FAILED)
            raise self.fail
        self.state.swap(WorkerState.STARTING, WorkerState.READY)

    async def stop(self, *, drain: float, kill_after: float, on_drained: Any = None) -> None:
        self._log.append(("stop", self.model))
        for _ in range(int(drain * 100)):  # drain in-flight requests, bounded as the real one
            if not self.inflight:
                break
            await asyncio.sleep(0.01)
        if on_drained is not None:
            on_drained()
        self.state.swap((WorkerState.READY, WorkerState.STARTING), WorkerState.STOPPING)
        if self.stop_delay:  # an engine taking its time to exit
            await asyncio.sleep(self.stop_delay)
            self._log.append(("stopped", self.model))
        self.state.swap(WorkerState.STOPPING, WorkerState.STOPPED)

    async def kill(self) -> None:
        self.state.swap((WorkerState.READY, WorkerState.STARTING), WorkerState.FAILED)

    def begin(self) -> None:
        self.inflight += 1

    def end(self) -> None:
        self.inflight -= 1


class FakeBooks:
    def __init__(self, sizes: dict[str, int], budget: int) -> None:
        self.sizes, self._budget = sizes, budget

    def need(self, entry: ModelEntry, loaded: Any = None,
             reserved: Any = None) -> tuple[dict[str, int], dict[str, int]]:
        n = {"ram": self.sizes.get(entry.name, GB)}
        return n, dict(n)

    def launch(self, entry: ModelEntry) -> ModelEntry:
        return entry

    def over_booking(self) -> dict[str, dict[str, int]]:
        return {}

    def budget(self) -> dict[str, int]:
        return {"ram": self._budget}

    def measure(self, entry: Any, worker: Any, estimate: Any) -> None:
        return None

    async def wait_released(self, workers: Any, timeout: float) -> None:
        return None


def make(sizes: dict[str, int], budget: int = 24 * GB, *, max_queue: int = 512,
         parallel: int = 1, keep_alive: str = "5m", max_loaded: int = 0,
         worker_kwargs: dict[str, dict[str, Any]] | None = None,
         failures: FailureTracker | None = None) -> tuple[Scheduler, list[tuple[str, str]]]:
    models = {n: {"backend": "command", "command": ["fake"], "parallel": parallel}
              for n in sizes}
    config = parse_config({"models": models, "max_queue": max_queue, "keep_alive": keep_alive,
                           "max_loaded": max_loaded, "memory": {"gpus": []}})
    log: list[tuple[str, str]] = []
    kw = worker_kwargs or {}

    def factory(entry: ModelEntry, on_exit: Any) -> FakeWorker:
        return FakeWorker(entry.name, log, **kw.get(entry.name, {}))

    s = Scheduler(config, Catalog(config), factory, FakeBooks(sizes, budget),  # type: ignore[arg-type]
                  failures=failures)
    return s, log


async def use(s: Scheduler, name: str, keep_alive: float | None = None) -> None:
    async with s.lease(name, keep_alive=keep_alive):
        await asyncio.sleep(0)


async def test_loads_once_and_reuses() -> None:
    s, log = make({"a": 4 * GB})
    await use(s, "a")
    await use(s, "a")
    assert log == [("start", "a")]
    await s.close()


async def test_concurrent_requests_share_one_start() -> None:
    s, log = make({"a": GB}, worker_kwargs={"a": {"start_delay": 0.05}}, parallel=8)
    await asyncio.gather(*(use(s, "a") for _ in range(8)))
    assert log.count(("start", "a")) == 1
    await s.close()


async def test_lru_idle_model_is_evicted_for_room() -> None:
    s, log = make({"a": 10 * GB, "b": 10 * GB, "c": 10 * GB})  # room for two
    await use(s, "a")
    await use(s, "b")
    await use(s, "a")  # b is now least recently used
    await use(s, "c")
    assert ("stop", "b") in log and ("stop", "a") not in log
    assert set(s.runners) == {"a", "c"}
    await s.close()


async def test_busy_model_is_never_evicted() -> None:
    s, log = make({"a": 10 * GB, "b": 10 * GB, "c": 10 * GB})
    await use(s, "b")
    async with s.lease("a"):  # a serves; b idle
        await use(s, "c")
        assert ("stop", "b") in log and ("stop", "a") not in log
    await s.close()


async def test_waits_for_a_busy_model_to_finish_when_nothing_idle() -> None:
    s, log = make({"a": 16 * GB, "b": 16 * GB})
    holder = asyncio.Event()

    async def hold_a() -> None:
        async with s.lease("a"):
            await holder.wait()

    t = asyncio.create_task(hold_a())
    await asyncio.sleep(0.01)
    load_b = asyncio.create_task(use(s, "b"))
    await asyncio.sleep(0.05)
    assert not load_b.done() and ("stop", "a") not in log
    holder.set()
    await asyncio.wait_for(load_b, 5)
    assert ("stop", "a") in log
    await t
    await s.close()


async def test_too_big_is_refused_at_once_without_evicting() -> None:
    s, log = make({"a": 4 * GB, "huge": 30 * GB})
    await use(s, "a")
    with pytest.raises(ModelTooLarge) as e:
        await use(s, "huge")
    assert "30.0 GiB" in e.value.message and "24.0 GiB" in e.value.message
    assert ("stop", "a") not in log and ("start", "huge") not in log
    await s.close()


async def test_max_loaded_counts() -> None:
    s, log = make({"a": GB, "b": GB}, max_loaded=1)
    await use(s, "a")
    await use(s, "b")
    assert ("stop", "a") in log and set(s.runners) == {"b"}
    await s.close()


async def test_queue_full_is_503_at_once_counting_slot_waiters() -> None:
    s, _ = make({"a": GB}, max_queue=2, parallel=1)
    gate = asyncio.Event()

    async def hold() -> None:
        async with s.lease("a"):
            await gate.wait()

    await use(s, "a")  # loaded: requests now wait only for its one slot
    holders = [asyncio.create_task(hold()) for _ in range(3)]  # 1 runs, 2 wait for the slot
    await asyncio.sleep(0.05)
    assert s.waiting == 2
    with pytest.raises(QueueFull) as e:
        await use(s, "a")
    assert e.value.status == 503 and e.value.headers["Retry-After"]
    gate.set()
    await asyncio.gather(*holders)
    assert s.waiting == 0
    await s.close()


async def test_waiting_client_that_leaves_leaves_the_queue() -> None:
    s, _ = make({"a": GB}, parallel=1)
    gate = asyncio.Event()

    async def hold() -> None:
        async with s.lease("a"):
            await gate.wait()

    h = asyncio.create_task(hold())
    await asyncio.sleep(0.01)
    waiter = asyncio.create_task(use(s, "a"))
    await asyncio.sleep(0.01)
    assert s.waiting == 1
    waiter.cancel()
    await asyncio.gather(waiter, return_exceptions=True)
    assert s.waiting == 0 and s.runners["a"].refs == 1
    gate.set()
    await h
    assert s.runners["a"].refs == 0
    await s.close()


async def test_loaded_model_does_not_wait_behind_another_load() -> None:
    s, _ = make({"a": GB, "slow": GB}, worker_kwargs={"slow": {"start_delay": 1.0}})
    await use(s, "a")
    slow = asyncio.create_task(use(s, "slow"))
    await asyncio.sleep(0.01)
    await asyncio.wait_for(use(s, "a"), 0.2)
    slow.cancel()
    await asyncio.gather(slow, return_exceptions=True)
    await s.close()


async def test_keep_alive_zero_unloads_after_last_request() -> None:
    s, log = make({"a": GB})
    await use(s, "a", keep_alive=0)
    for _ in range(100):
        if "a" not in s.runners:
            break
        await asyncio.sleep(0.01)
    assert "a" not in s.runners and ("stop", "a") in log
    await s.close()


async def test_keep_alive_expires_and_negative_pins() -> None:
    s, log = make({"a": GB, "b": GB})
    await use(s, "a", keep_alive=0.05)
    await use(s, "b", keep_alive=math.inf)
    assert s.runners["b"].expires_at is None and s.runners["a"].expires_at is not None
    await asyncio.sleep(0.3)
    assert "a" not in s.runners and "b" in s.runners
    await s.close()


async def test_pinned_models_evicted_last() -> None:
    s, log = make({"p": 10 * GB, "x": 10 * GB, "y": 10 * GB})
    await use(s, "p", keep_alive=math.inf)  # pinned, and least recently used
    await use(s, "x")
    await use(s, "y")
    assert ("stop", "x") in log and ("stop", "p") not in log
    await s.close()


async def test_unknown_model_404() -> None:
    s, _ = make({"a": GB})
    with pytest.raises(ModelNotFound):
        await use(s, "nope")
    await s.close()


async def test_oom_load_failure_evicts_idle_and_retries_once() -> None:
    oom = WorkerLoadError("boom: out of memory", oom=True, stderr="out of memory")
    s, log = make({"a": GB, "b": GB}, worker_kwargs={"b": {"fail": oom}})
    await use(s, "a")
    with pytest.raises(WorkerLoadError):
        await use(s, "b")
    assert log.count(("start", "b")) == 2 and ("stop", "a") in log
    await s.close()


async def test_crash_loop_marks_failed_and_refuses_at_once() -> None:
    err = WorkerLoadError("engine exited with code 1: bad model", stderr="bad model")
    clock = [0.0]
    failures = FailureTracker(limit=3, base=0.0, cap=0.0, cool_off=60, clock=lambda: clock[0])
    s, log = make({"a": GB}, worker_kwargs={"a": {"fail": err}}, failures=failures)
    for _ in range(3):
        with pytest.raises(WorkerLoadError):
            await use(s, "a")
    with pytest.raises(ModelFailed) as e:
        await use(s, "a")
    assert "bad model" in e.value.message and log.count(("start", "a")) == 3
    clock[0] = 61.0  # cool-off over: one more attempt is allowed
    with pytest.raises(WorkerLoadError):
        await use(s, "a")
    await s.close()


def test_backoff_grows_and_caps() -> None:
    clock = [100.0]
    f = FailureTracker(limit=10, base=0.5, cap=4.0, clock=lambda: clock[0])
    delays = []
    for _ in range(6):
        f.record("m", "x")
        delays.append(f.delay("m"))
    assert delays == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    f.healthy("m")
    assert f.delay("m") == 0


async def test_preload_in_budget_order() -> None:
    s, log = make({"a": 2 * GB, "b": GB})
    cfg = parse_config({"models": {n: {"backend": "command", "command": ["f"], "preload": True}
                                   for n in ("a", "b")}, "memory": {"gpus": []}})
    s.catalog.refresh(cfg)
    await s.preload()
    assert [m for op, m in log if op == "start"] == ["b", "a"]
    await s.close()


async def test_other_load_options_reload_once_idle() -> None:
    from dataclasses import replace

    s, log = make({"a": GB})
    await use(s, "a")
    entry = s.catalog.resolve("a")
    bigger = replace(entry, launch=replace(entry.launch, ctx_size=8192))
    gate = asyncio.Event()

    async def hold() -> None:
        async with s.lease("a"):
            await gate.wait()

    h = asyncio.create_task(hold())
    await asyncio.sleep(0.01)
    other = asyncio.create_task(s.load("a", entry=bigger))
    await asyncio.sleep(0.05)
    assert not other.done() and log.count(("start", "a")) == 1  # waits for the busy one
    gate.set()
    await asyncio.wait_for(other, 5)
    await h
    assert log == [("start", "a"), ("stop", "a"), ("start", "a")]
    assert s.runners["a"].entry.launch.ctx_size == 8192
    await use(s, "a", )  # the catalog's entry differs again → reload back
    assert log.count(("start", "a")) == 3
    await s.close()


# ---------------------------------------------------------------- overlapped swaps

SLOW_STOP = {"stop_delay": 0.3}


async def test_count_limit_swap_loads_while_the_old_engine_exits() -> None:
    """max_loaded alone asks for room and memory holds both: the new model starts at once."""
    s, log = make({"a": GB, "b": GB}, max_loaded=1, worker_kwargs={"a": SLOW_STOP})
    await use(s, "a")
    await use(s, "b")
    assert log.index(("start", "b")) < len(log) and ("stopped", "a") not in log
    assert set(s.runners) == {"b"} and len(s._stopping) == 1
    for _ in range(100):
        if not s._stopping:
            break
        await asyncio.sleep(0.02)
    assert ("stopped", "a") in log and not s._stopping
    await s.close()


async def test_memory_eviction_waits_for_the_exit() -> None:
    s, log = make({"a": 10 * GB, "b": 10 * GB}, budget=15 * GB, max_loaded=1,
                  worker_kwargs={"a": SLOW_STOP})
    await use(s, "a")
    await use(s, "b")
    assert log.index(("stopped", "a")) < log.index(("start", "b"))
    await s.close()


async def test_an_exiting_engine_still_holds_its_memory() -> None:
    """a exits behind b's load; c fits only once a is gone, so c waits for that exit."""
    s, log = make({"a": 6 * GB, "b": 5 * GB, "c": 7 * GB}, budget=12 * GB, max_loaded=1,
                  worker_kwargs={"a": SLOW_STOP})
    await use(s, "a")
    await use(s, "b")  # 6 + 5 fit: a stops behind
    assert ("stopped", "a") not in log
    await use(s, "c")  # 6 (a, exiting) + 7 do not fit: wait for a
    assert log.index(("stopped", "a")) < log.index(("start", "c"))
    assert set(s.runners) == {"c"}
    await s.close()


async def test_close_stops_engines_still_exiting() -> None:
    s, log = make({"a": GB, "b": GB}, max_loaded=1, worker_kwargs={"a": SLOW_STOP})
    await use(s, "a")
    await use(s, "b")
    await s.close()
    assert ("stopped", "a") in log and ("stop", "b") in log
