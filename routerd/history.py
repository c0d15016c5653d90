"""What the dashboard draws and lists: bounded, in-memory, the last hour.

- `History`: tokens/s per model (one point per finished request) and memory per model and
  resource (one point per sample), each kept for `window` seconds and at most `points` long.
- `ActivityLog`: the last N finished requests, newest last.

Nothing here does I/O or owns a task; the dashboard's context feeds them.
"""

from __future__ import annotations

import collections
import time
from typing import Any, Iterable

Point = tuple[float, float]


class Series:
    """A bounded (time, value) series; old points fall off by count and by age."""

    __slots__ = ("points", "window")

    def __init__(self, maxlen: int, window: float) -> None:
        self.points: collections.deque[Point] = collections.deque(maxlen=maxlen)
        self.window = window

    def add(self, t: float, value: float) -> None:
        self.points.append((t, value))

    def since(self, now: float) -> list[Point]:
        cutoff = now - self.window
        while self.points and self.points[0][0] < cutoff:
            self.points.popleft()
        return list(self.points)


class History:
    def __init__(self, *, window: float = 3600.0, points: int = 720,
                 max_models: int = 64) -> None:
        self.window, self.maxlen, self.max_models = window, points, max_models
        self.tokens: dict[str, Series] = {}
        self.memory: dict[str, dict[str, Series]] = {}

    def _series(self, table: dict[str, Any], model: str, make: Any) -> Any:
        if model not in table:
            if len(table) >= self.max_models:  # a bounded number of models: drop the stalest
                table.pop(next(iter(table)))
            table[model] = make()
        return table[model]

    def add_tokens_per_s(self, model: str, rate: float, t: float | None = None) -> None:
        s = self._series(self.tokens, model, lambda: Series(self.maxlen, self.window))
        s.add(t or time.time(), round(rate, 2))

    def add_memory(self, model: str, held: dict[str, int], t: float | None = None) -> None:
        by_res = self._series(self.memory, model, dict)
        now = t or time.time()
        for res, n in held.items():
            if res not in by_res:
                by_res[res] = Series(self.maxlen, self.window)
            by_res[res].add(now, float(n))

    def snapshot(self, now: float | None = None) -> dict[str, Any]:
        now = now or time.time()
        tokens = {m: s.since(now) for m, s in self.tokens.items()}
        memory = {m: {r: s.since(now) for r, s in by.items()} for m, by in self.memory.items()}
        return {"window": self.window, "now": now,
                "tokens_per_s": {m: p for m, p in tokens.items() if p},
                "memory": {m: by for m, by in memory.items() if any(by.values())}}


class ActivityLog:
    """The last `size` finished requests (dicts ready for JSON), oldest first."""

    def __init__(self, size: int = 500) -> None:
        self._items: collections.deque[dict[str, Any]] = collections.deque(maxlen=size)

    def add(self, record: dict[str, Any]) -> None:
        self._items.append(record)

    def last(self, n: int, model: str | None = None) -> list[dict[str, Any]]:
        items: Iterable[dict[str, Any]] = self._items
        if model:
            items = [r for r in items if r.get("model") == model]
        out = list(items)
        return out[-n:] if n > 0 else []
