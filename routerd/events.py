"""An in-process event bus: the scheduler, the store and the request path publish JSON-ready
events; `/api/events` (SSE) and the dashboard subscribe.

`publish` is synchronous, never blocks and never raises: each subscriber has a bounded queue,
and a subscriber that falls behind loses its oldest events (and is told how many) rather than
slowing the publisher. With no subscriber, publishing costs one dict and a deque append.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import time
from typing import Any, Callable, Iterator, Protocol


class EventSink(Protocol):
    def publish(self, type: str, **fields: Any) -> None: ...


class NullEvents:
    """An EventSink that drops everything (tests and tools that need no bus)."""

    def publish(self, type: str, **fields: Any) -> None:
        return None


class Subscription:
    def __init__(self, maxlen: int) -> None:
        self._queue: collections.deque[dict[str, Any]] = collections.deque(maxlen=maxlen)
        self._ready = asyncio.Event()
        self.dropped = 0
        self.closed = False

    def close(self) -> None:
        """Wake the reader for good: `get` answers None from now on once the queue is empty."""
        self.closed = True
        self._ready.set()

    def put(self, event: dict[str, Any]) -> None:
        if len(self._queue) == self._queue.maxlen:
            self.dropped += 1
        self._queue.append(event)
        self._ready.set()

    async def get(self, timeout: float | None = None) -> dict[str, Any] | None:
        """The next event, or None when `timeout` passes first."""
        if not self._queue:
            if self.closed:
                return None
            self._ready.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._ready.wait(), timeout)
            if not self._queue:
                return None
        return self._queue.popleft()


class EventBus:
    def __init__(self, *, history: int = 200, queue: int = 1000) -> None:
        self._subs: set[Subscription] = set()
        self._seq = itertools.count(1)
        self._queue = queue
        self.closed = False
        self._listeners: list[Callable[[dict[str, Any]], None]] = []
        self.recent: collections.deque[dict[str, Any]] = collections.deque(maxlen=history)

    def publish(self, type: str, **fields: Any) -> None:
        try:
            event = {**fields, "id": next(self._seq), "type": type, "time": time.time()}
            self.recent.append(event)
            for sub in self._subs:
                sub.put(event)
            for fn in self._listeners:
                try:
                    fn(event)
                except Exception:  # noqa: BLE001 - one consumer's bug is not the publisher's
                    pass
        except Exception:  # noqa: BLE001 - a publisher must never fail for its audience
            pass

    def listen(self, fn: Callable[[dict[str, Any]], None]) -> Callable[[], None]:
        """An in-process consumer, called inside publish (so it must be quick and must not
        block); not counted as a subscriber. Returns the function that removes it."""
        self._listeners.append(fn)
        return lambda: self._listeners.remove(fn) if fn in self._listeners else None

    @property
    def last_id(self) -> int:
        return self.recent[-1]["id"] if self.recent else 0

    def close(self) -> None:
        """Shutting down: every subscription's reader wakes and sees `closed`."""
        self.closed = True
        for sub in list(self._subs):
            sub.close()

    @property
    def subscribers(self) -> int:
        return len(self._subs)

    @contextlib.contextmanager
    def subscribe(self) -> Iterator[Subscription]:
        sub = Subscription(self._queue)
        if self.closed:
            sub.close()
        self._subs.add(sub)
        try:
            yield sub
        finally:
            self._subs.discard(sub)
