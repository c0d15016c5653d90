"""Swap-aware scheduling against fake workers (no processes): swap_batch bounds how many
requests overtake a load waiting for room, min_resident stops ping-pong, requests for other
models never starve, a load that fits once a busy model finishes waits instead of a 507, and a
client leaving mid-load leaves the load running. Counts, never timings."""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Any

import pytest

from routerd.catalog import Catalog, ModelEntry
from routerd.config import parse_config
from routerd.errors import ModelBusy, ModelTooLarge
from routerd.scheduler.scheduler import Scheduler
from tests.scheduler.test_scheduler import GB, FakeBooks, FakeWorker

pytestmark = pytest.mark.timeout(60)
ROOM_FOR_ONE = {"a": 16 * GB, "b": 16 * GB}  # budget 24 GiB


def make(sizes: dict[str, int] = ROOM_FOR_ONE, *, parallel: int = 1, budget: int = 24 * GB,
         worker_kwargs: dict[str, dict[str, Any]] | None = None, **top: Any
         ) -> tuple[Scheduler, list[tuple[str, str]]]:
    models = {n: {"backend": "command", "command": ["fake"], "parallel": parallel}
              for n in sizes}
    config = parse_config({"models": models, "memory": {"gpus": []}, **top})
    log: list[tuple[str, str]] = []
    kw = worker_kwargs or {}

    def factory(entry: ModelEntry, on_exit: Any) -> FakeWorker:
        return FakeWorker(entry.name, log, **kw.get(entry.name, {}))

    s = Scheduler(config, Catalog(config), factory, FakeBooks(sizes, budget))  # type: ignore[arg-type]
    return s, log


class Served:
    """Requests in the order they got their slot, each with the order they arrived in."""

    def __init__(self) -> None:
        self.order: list[tuple[int, str]] = []  # (arrival number, model)
        self._arrivals = itertools.count()

    async def use(self, s: Scheduler, name: str, hold: float = 0.0,
                  gate: asyncio.Event | None = None) -> None:
        n = next(self._arrivals)
        async with s.lease(name):
            self.order.append((n, name))
            if gate is not None:
                await gate.wait()
            await asyncio.sleep(hold)

    def overtaken(self) -> int:
        """The most requests for another model that came after one request and were served
        before it."""
        worst = 0
        for i, (n, model) in enumerate(self.order):
            ahead = sum(1 for m, other in self.order[:i] if other != model and m > n)
            worst = max(worst, ahead)
        return worst


def swaps(log: list[tuple[str, str]]) -> int:
    return sum(1 for op, _ in log if op == "start") - 1


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0.01)


async def test_overtaking_a_waiting_load_is_bounded_by_swap_batch() -> None:
    s, log = make(swap_batch=2, min_resident=0)
    served, hold = Served(), asyncio.Event()
    first = asyncio.create_task(served.use(s, "a", gate=hold))
    await settle()
    b = asyncio.create_task(served.use(s, "b"))  # needs a's room: a is busy
    await settle()
    later = [asyncio.create_task(served.use(s, "a")) for _ in range(5)]  # after b's load
    await settle()
    assert s.batches.gates  # a is gated for b
    hold.set()
    await asyncio.wait_for(asyncio.gather(first, b, *later), 20)
    models = [m for _, m in served.order]
    assert models[:4] == ["a", "a", "a", "b"]  # the first one, then 2 overtake b, then b
    assert models[4:] == ["a"] * 3  # the other 3 stepped aside, for a's reload
    assert swaps(log) == 2 and not s.batches.gates
    await s.close()


async def test_swap_batch_zero_is_arrival_order() -> None:
    """Requests that came before the waiting load are served first; later ones wait."""
    s, _ = make(swap_batch=0, min_resident=0)
    served, hold = Served(), asyncio.Event()
    first = asyncio.create_task(served.use(s, "a", gate=hold))
    await settle()
    ahead = [asyncio.create_task(served.use(s, "a")) for _ in range(2)]
    await settle()
    b = asyncio.create_task(served.use(s, "b"))
    await settle()
    behind = [asyncio.create_task(served.use(s, "a")) for _ in range(2)]
    await settle()
    hold.set()
    await asyncio.wait_for(asyncio.gather(first, b, *ahead, *behind), 20)
    assert [m for _, m in served.order] == ["a", "a", "a", "b", "a", "a"]
    assert served.overtaken() == 0
    await s.close()


async def test_continuous_traffic_never_starves_the_other_model() -> None:
    """Four clients keep a busy (its refs never reach 0): b still gets in, after one batch
    (before swap_batch, b would have waited timeouts.load and failed)."""
    s, log = make(parallel=2, min_resident=0, timeouts={"load": 600})
    served, stop = Served(), asyncio.Event()

    async def client() -> None:
        while not stop.is_set():
            await served.use(s, "a", hold=0.005)

    clients = [asyncio.create_task(client()) for _ in range(4)]
    await settle()
    await asyncio.wait_for(served.use(s, "b"), 20)
    stop.set()
    await asyncio.wait_for(asyncio.gather(*clients), 20)
    i = next(i for i, (_, m) in enumerate(served.order) if m == "b")
    b_arrival = served.order[i][0]
    overtakers = [n for n, m in served.order[:i] if m == "a" and n > b_arrival]
    assert len(overtakers) <= 8  # the default swap_batch
    assert ("stop", "a") in log
    await s.close()


async def test_wait_alone_bounds_the_batch() -> None:
    s, log = make(parallel=2, min_resident=0, swap_batch="0.2s")
    stop = asyncio.Event()
    served = Served()

    async def client() -> None:
        while not stop.is_set():
            await served.use(s, "a", hold=0.005)

    clients = [asyncio.create_task(client()) for _ in range(4)]
    await settle()
    t0 = time.monotonic()
    await asyncio.wait_for(served.use(s, "b"), 20)
    assert time.monotonic() - t0 >= 0.2  # a lower bound only: a busy machine just waits more
    stop.set()
    await asyncio.wait_for(asyncio.gather(*clients), 20)
    await s.close()


async def run_alternating(s: Scheduler, clients: int, rounds: int,
                          hold: float = 0.002) -> Served:
    """`clients` clients, each alternating a, b, a, b ... for `rounds` requests."""
    served = Served()

    async def client(i: int) -> None:
        for k in range(rounds):
            await served.use(s, "ab"[(i + k) % 2], hold=hold)

    await asyncio.wait_for(asyncio.gather(*(client(i) for i in range(clients))), 50)
    return served


async def test_eight_alternating_clients_swap_once_per_batch() -> None:
    s, log = make(parallel=2, swap_batch=4, min_resident=0)
    served = await run_alternating(s, 8, 10)
    assert len(served.order) == 80
    assert served.overtaken() <= 4  # no request waited past the bound
    assert swaps(log) <= 80 // 4  # at least a batch of requests per swap
    await s.close()


async def test_batching_swaps_less_than_arrival_order() -> None:
    """Clients that stick to one model each (4 on a, 4 on b): arrival order swaps about
    every round; a batch of 8 lets each model serve more per load."""
    counts = {}
    for batch in (0, 8):
        s, log = make(parallel=2, swap_batch=batch, min_resident=0)
        served = Served()

        async def client(model: str) -> None:
            for _ in range(12):
                await served.use(s, model, hold=0.002)

        await asyncio.wait_for(asyncio.gather(*(client("ab"[i % 2]) for i in range(8))), 50)
        counts[batch] = swaps(log)
        if batch:
            assert served.overtaken() <= batch
        await s.close()
    assert counts[8] < counts[0]


async def test_min_resident_bounds_swaps_per_second() -> None:
    """swap_batch 0 would swap at every arrival; min_resident keeps a model that displaced
    the other one for min_resident while it has work: swaps <= elapsed / min_resident + 2
    (the first swap has nobody to protect, the last comes when one side's work runs out; an
    upper bound a slow machine only makes easier)."""
    s, log = make(parallel=2, swap_batch=0, min_resident="0.25s")
    served = Served()
    t0 = time.monotonic()

    async def client(model: str) -> None:
        for _ in range(30):
            await served.use(s, model, hold=0.003)

    await asyncio.wait_for(asyncio.gather(*(client("ab"[i % 2]) for i in range(8))), 50)
    elapsed = time.monotonic() - t0
    assert len(served.order) == 240
    assert swaps(log) <= elapsed / 0.25 + 2, (swaps(log), elapsed)
    await s.close()


async def test_a_model_that_displaced_another_stays_min_resident_while_busy() -> None:
    s, log = make(parallel=2, swap_batch=0, min_resident="0.5s")
    stop = asyncio.Event()
    await Served().use(s, "a")

    async def client() -> None:
        while not stop.is_set():
            await Served().use(s, "b", hold=0.005)

    t0 = time.monotonic()  # before b's load evicts a
    clients = [asyncio.create_task(client()) for _ in range(3)]  # b evicts a, stays busy
    while "b" not in s.runners or not s.runners["b"].worker.ready:
        await asyncio.sleep(0.01)
    await asyncio.wait_for(Served().use(s, "a"), 20)  # a back: only after min_resident
    assert time.monotonic() - t0 >= 0.5
    stop.set()
    await asyncio.wait_for(asyncio.gather(*clients), 20)
    await s.close()


async def test_a_load_that_fits_once_busy_models_finish_waits_then_503() -> None:
    s, log = make(timeouts={"load": "0.3s"})
    hold = asyncio.Event()
    first = asyncio.create_task(Served().use(s, "a", gate=hold))
    await settle()
    with pytest.raises(ModelBusy) as e:  # waited timeouts.load for a to finish: 503, retry
        await Served().use(s, "b")
    assert e.value.status == 503 and e.value.headers["Retry-After"]
    hold.set()
    await first
    s2, _ = make({"a": 16 * GB, "huge": 30 * GB})
    with pytest.raises(ModelTooLarge):  # can never fit: 507 at once
        await asyncio.wait_for(Served().use(s2, "huge"), 1)
    await s.close()
    await s2.close()


async def test_a_client_leaving_mid_load_leaves_the_load_running() -> None:
    s, log = make(worker_kwargs={"a": {"start_delay": 0.3}})
    waiter = asyncio.create_task(Served().use(s, "a"))
    await settle()
    waiter.cancel()
    await asyncio.gather(waiter, return_exceptions=True)
    assert "a" in s._loading
    for _ in range(1000):  # bounded: 10 s for a 0.3 s start on a busy machine
        if "a" in s.runners and s.runners["a"].worker.ready and "a" not in s._loading:
            break
        await asyncio.sleep(0.01)
    assert s.runners["a"].worker.ready and s.runners["a"].refs == 0
    assert s.runners["a"].timer is not None  # keep_alive applies
    await s.close()


async def test_abort_unwanted_loads_cancels_a_load_nobody_waits_for() -> None:
    s, log = make(abort_unwanted_loads=True, worker_kwargs={"a": {"start_delay": 0.5}})
    one = asyncio.create_task(Served().use(s, "a"))
    two = asyncio.create_task(Served().use(s, "a"))
    await settle()
    one.cancel()
    await asyncio.gather(one, return_exceptions=True)
    assert "a" in s._loading  # another request still waits
    two.cancel()
    await asyncio.gather(two, return_exceptions=True)
    for _ in range(1000):
        if "a" not in s._loading:
            break
        await asyncio.sleep(0.01)
    assert "a" not in s._loading and "a" not in s.runners
    await s.close()


async def test_load_progress_is_published_and_load_time_kept() -> None:
    from routerd.events import EventBus

    s, log = make(worker_kwargs={"a": {"start_delay": 1.3}})
    bus = EventBus()
    s.events = bus
    await Served().use(s, "a")
    seen = list(bus.recent)
    loading = [e for e in seen if e["type"] == "model.loading"]
    assert loading and 0 <= loading[0]["progress"] < 1 and loading[0]["model"] == "a"
    await s.close()
