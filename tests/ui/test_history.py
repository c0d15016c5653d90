"""The dashboard's in-memory history stays bounded: by age, by count and by model."""

from __future__ import annotations

from routerd.history import ActivityLog, History


def test_series_drop_old_and_excess_points() -> None:
    h = History(window=60, points=5, max_models=2)
    for i in range(10):
        h.add_tokens_per_s("a", float(i), t=1000 + i)
    assert [v for _, v in h.tokens["a"].points] == [5, 6, 7, 8, 9]  # by count
    snap = h.snapshot(now=1066.5)  # points older than the window (before 1006.5) go
    assert [v for _, v in snap["tokens_per_s"]["a"]] == [7, 8, 9]
    h.add_memory("a", {"ram": 1}, t=1)
    h.add_memory("b", {"ram": 2}, t=1)
    h.add_memory("c", {"ram": 3, "gpu0": 4}, t=1)
    assert list(h.memory) == ["b", "c"]  # at most max_models, the stalest dropped
    assert h.snapshot(now=1)["memory"]["c"] == {"ram": [(1, 3.0)], "gpu0": [(1, 4.0)]}


def test_activity_keeps_the_last_n() -> None:
    log = ActivityLog(size=3)
    for i in range(5):
        log.add({"model": "a" if i % 2 else "b", "n": i})
    assert [r["n"] for r in log.last(10)] == [2, 3, 4]
    assert [r["n"] for r in log.last(10, "a")] == [3]
    assert log.last(0) == []
