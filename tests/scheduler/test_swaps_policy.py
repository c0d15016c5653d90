"""The pure parts of swap-aware scheduling: victims by cost, blockers, the overtaking bound,
and load progress from the engine's output or the clock."""

from __future__ import annotations

import math

from routerd.scheduler import progress
from routerd.scheduler.policy import (Loaded, blockers, choose_victims, eviction_order,
                                      eviction_score, may_overtake, reload_cost)

GB = 1 << 30
BUDGET = {"ram": 24 * GB}


def m(name: str, size: int = 10, *, idle_since: float = 0.0, load_s: float = 0.0,
      busy: int = 0, pinned: bool = False) -> Loaded:
    return Loaded(name, {"ram": size * GB}, busy, idle_since, pinned, load_s)


def names(ms: list[Loaded] | None) -> list[str] | None:
    return None if ms is None else [x.name for x in ms]


def test_cheap_to_reload_goes_before_expensive_at_equal_idle() -> None:
    loaded = [m("slow", load_s=30.0), m("fast", load_s=1.0)]
    assert names(choose_victims({"ram": 10 * GB}, loaded, BUDGET, now=100.0)) == ["fast"]


def test_long_idle_beats_cheap() -> None:
    # fast idle 5 s (score 5), slow idle 300 s with a 30 s reload (score 10)
    loaded = [m("fast", idle_since=295.0, load_s=1.0), m("slow", idle_since=0.0, load_s=30.0)]
    assert names(choose_victims({"ram": 10 * GB}, loaded, BUDGET, now=300.0)) == ["slow"]
    assert eviction_score(loaded[1], 300.0) > eviction_score(loaded[0], 300.0)


def test_pinned_last_whatever_the_score() -> None:
    loaded = [m("pinned", idle_since=0.0, load_s=0.1, pinned=True),
              m("fresh", idle_since=99.0, load_s=60.0)]
    assert names(eviction_order(loaded, now=100.0)) == ["fresh", "pinned"]


def test_unmeasured_models_are_costed_by_size() -> None:
    assert reload_cost(m("x", 4)) < reload_cost(m("y", 8))
    assert reload_cost(m("z", 8, load_s=2.0)) == 2.0


def test_without_a_clock_the_order_is_lru() -> None:
    loaded = [m("b", idle_since=2.0, load_s=1.0), m("a", idle_since=1.0, load_s=100.0)]
    assert names(eviction_order(loaded)) == ["a", "b"]


def test_blockers_are_the_busy_models_that_must_go() -> None:
    loaded = [m("idle", 6), m("busy1", 10, busy=1), m("busy2", 6, busy=2)]
    # 22 GiB used; 12 needed: the idle one (6) is not enough, one busy model must go too
    assert len(blockers({"ram": 12 * GB}, loaded, BUDGET, now=10.0)) == 1
    assert blockers({"ram": 4 * GB}, loaded, BUDGET, now=10.0) == []  # the idle one will do
    assert blockers({"ram": 30 * GB}, loaded, BUDGET) == []  # never fits: nothing to gate


def test_may_overtake_counts_and_waits() -> None:
    assert may_overtake(0, 0.0, 1.0, requests=2, wait=math.inf)
    assert not may_overtake(2, 0.0, 1.0, requests=2, wait=math.inf)
    assert not may_overtake(0, 0.0, 5.0, requests=100, wait=5.0)
    assert not may_overtake(0, 0.0, 0.0, requests=0, wait=math.inf)  # arrival order
    assert may_overtake(9, 0.0, 1.0, requests=2, wait=0.5, resident_until=2.0)  # min_resident


LLAMA_SERVER_LOAD = [  # lines the vendored llama-server prints while it loads (-lv 3 and 4)
    "0.01.188 I llama_model_loader: loaded meta data with 33 key-value pairs",
    "0.01.610 I load_tensors:   CPU_Mapped model buffer size =    92.10 MiB",
    "0.01.814 I llama_kv_cache: size =  180.00 MiB",
    "0.01.832 I cmn  common_init_: warming up the model with an empty run - please wait",
    "0.10.796 I srv    load_model: initializing, n_slots = 4, n_ctx_slot = 8192",
]


def test_progress_follows_the_engine_phases() -> None:
    seen = [progress.from_output(LLAMA_SERVER_LOAD[:i]) for i in range(len(LLAMA_SERVER_LOAD) + 1)]
    assert seen == sorted(seen) and seen[0] == 0 and 0.85 <= seen[-1] < 1
    assert progress.from_output(["." * 42]) == 0.42  # llama.cpp's progress dots


def test_progress_from_the_clock() -> None:
    assert progress.from_time(5.0, 10.0) == 0.5
    assert progress.from_time(50.0, 10.0) == progress.TIMED_CAP  # never done by time alone
    assert 0 < progress.from_time(5.0, None) < progress.from_time(50.0, None) < 0.9
    assert progress.load_progress(LLAMA_SERVER_LOAD[:2], 1.0, 100.0) == 0.3  # engine ahead
    assert progress.load_progress([], 9.0, 10.0) == 0.9  # clock ahead
