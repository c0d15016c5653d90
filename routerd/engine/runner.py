"""Serialised access to the one model: an asyncio lock, a thread per job, a bounded channel.

A job is a plain generator run in a worker thread while the runner's lock is held; each
value it yields travels to the event loop through a `Channel` (bounded: the thread
blocks when the client reads slowly). The lock is released by the thread itself, in
`finally`, once it no longer touches the model, so a client that vanishes can never free
the model while a token is still being computed.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from dataclasses import dataclass
from typing import Any, AsyncGenerator, AsyncIterator, Callable, Generic, Iterator, TypeVar

import structlog

from routerd.engine.stats import GenerationControl, TokenStats

log = structlog.get_logger(__name__)

T = TypeVar("T")
M = TypeVar("M")
Job = Callable[[M, GenerationControl], Iterator[T]]

CHANNEL_CAPACITY = 64


class RunnerClosed(RuntimeError):
    """The worker is shutting down; no new job starts."""


@dataclass(frozen=True)
class Piece:
    """One streamed object; `stats` is set on the one that ends the generation."""

    data: dict[str, Any]
    stats: TokenStats | None = None


@dataclass(frozen=True)
class _End:
    error: BaseException | None


class Channel(Generic[T]):
    """Thread → event loop hand-off with back-pressure (`capacity` items in flight)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, capacity: int = CHANNEL_CAPACITY) -> None:
        self._loop = loop
        self._queue: asyncio.Queue[T | _End] = asyncio.Queue()
        self._space = threading.Semaphore(capacity)
        self._closed = threading.Event()

    def put(self, item: T) -> bool:
        """Thread side; blocks while full. False: the reader is gone, stop producing."""
        self._space.acquire()
        if self._closed.is_set():
            return False
        return self._post(item)

    def finish(self, error: BaseException | None) -> None:
        """Loop side: the job is over (with `error` if it failed)."""
        self._queue.put_nowait(_End(error))

    def _post(self, item: T | _End) -> bool:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is reading
            return False
        return True

    async def get(self) -> T | _End:
        item = await self._queue.get()
        if not isinstance(item, _End):
            self._space.release()
        return item

    def close(self) -> None:
        """Reader side: no more reads; wakes a producer blocked in `put`."""
        self._closed.set()
        self._space.release()


class ModelRunner(Generic[M]):
    """Owns the model; runs one job at a time; reports `slots` like llama-server."""

    def __init__(self, model: M, slots: int) -> None:
        self.model = model
        self.slots = slots
        self._lock = asyncio.Lock()
        self._waiting = 0
        self._closing = False
        self._current: GenerationControl | None = None
        self.produced = 0  # items (tokens) jobs have produced: progress, reported by /slots

    @property
    def busy(self) -> bool:
        return self._lock.locked()

    def slot_states(self) -> list[bool]:
        """Slot i is processing while i < requests running or waiting for the model."""
        in_flight = self._waiting + (1 if self._lock.locked() else 0)
        return [i < in_flight for i in range(self.slots)]

    async def stream(self, job: Job[M, T]) -> AsyncGenerator[T, None]:
        """Run `job` with the model; yield what it yields. Closing the iterator cancels it.

        Use as `async with contextlib.aclosing(runner.stream(job)) as items:`.
        """
        loop = asyncio.get_running_loop()
        channel: Channel[T] = Channel(loop)
        control = GenerationControl()
        self._waiting += 1
        try:
            await self._lock.acquire()
        finally:
            self._waiting -= 1
        if self._closing:
            self._lock.release()
            raise RunnerClosed("the engine is shutting down")
        try:
            self._current = control
            thread = threading.Thread(target=self._work, args=(job, control, channel, loop),
                                      name="engine-job", daemon=True)
            thread.start()
        except BaseException:
            self._release()
            raise
        try:
            while True:
                item = await channel.get()
                if isinstance(item, _End):
                    if item.error is not None:
                        raise item.error
                    return
                self.produced += 1
                yield item
        finally:
            control.cancel()
            channel.close()

    async def call(self, job: Job[M, T]) -> T:
        """Run a job that yields one value; return it once the job is over (model free)."""
        results: list[T] = []
        async with contextlib.aclosing(self.stream(job)) as items:
            async for item in items:
                results.append(item)
        if not results:
            raise RuntimeError("engine job produced no result")
        return results[0]

    def _work(self, job: Job[M, T], control: GenerationControl, channel: Channel[T],
              loop: asyncio.AbstractEventLoop) -> None:
        error: BaseException | None = None
        items: Iterator[T] | None = None
        try:
            control.start()
            items = job(self.model, control)
            for item in items:
                if not channel.put(item):
                    break
        except Exception as exc:  # reported to the reader, which renders it
            error = exc
        finally:
            try:
                if items is not None and hasattr(items, "close"):
                    items.close()  # stop the library's generator before freeing the model
            except Exception as exc:
                log.warning("engine.job_close_failed", error=str(exc))
            try:  # one callback: the model is free before the reader sees the end
                loop.call_soon_threadsafe(self._finish, channel, error)
            except RuntimeError:
                pass  # loop gone: the process is exiting

    def _finish(self, channel: Channel[T], error: BaseException | None) -> None:
        self._release()
        channel.finish(error)

    def _release(self) -> None:
        self._current = None
        self._lock.release()

    async def close(self, timeout: float) -> bool:
        """Refuse new jobs, cancel the running one, wait (bounded) until the model is free."""
        self._closing = True
        if self._current is not None:
            self._current.cancel()
        try:
            await asyncio.wait_for(self._lock.acquire(), timeout)
        except asyncio.TimeoutError:
            return False
        self._lock.release()
        return True
