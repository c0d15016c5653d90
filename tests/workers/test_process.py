"""Worker against the fake worker process: start, readiness, load failures, drain, SIGTERM →
SIGKILL, the process group and the lifeline. Real processes, loopback only."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from typing import AsyncIterator

import aiohttp
import psutil
import pytest

from routerd.workers.backends import Argv
from routerd.workers.process import Worker, WorkerLoadError
from routerd.workers.state import WorkerState
from tests.conftest import FAKE_WORKER, ROOT

pytestmark = pytest.mark.timeout(60)


def fake_argv(*flags: str, lifeline: bool = False, prefix: tuple[str, ...] = ()):  # noqa: ANN201
    def build(host: str, port: int, api_key: str) -> Argv:
        argv = [sys.executable, str(FAKE_WORKER), "--host", host, "--port", str(port),
                "--api-key", api_key, *flags]
        return Argv([*prefix, *argv], lifeline_flag=lifeline)
    return build


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.fixture
async def workers() -> AsyncIterator[list[Worker]]:
    """Every Worker a test makes is killed afterwards, whatever happened."""
    made: list[Worker] = []
    yield made
    for w in made:
        await w.kill()


async def make(session: aiohttp.ClientSession, workers: list[Worker], *flags: str,
               **kw) -> Worker:  # noqa: ANN003
    w = Worker("fake", fake_argv(*flags, **kw), session)
    workers.append(w)
    return w


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def wait_gone(pid: int, timeout: float) -> float:
    t0 = time.monotonic()
    while not gone(pid):
        assert time.monotonic() - t0 < timeout, f"pid {pid} still alive after {timeout}s"
        await asyncio.sleep(0.02)
    return time.monotonic() - t0


async def stream_chat(session: aiohttp.ClientSession, w: Worker) -> list[str]:
    body = {"model": "fake", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    events = []
    async with session.post(w.base_url + "/v1/chat/completions", json=body,
                            headers=w.auth_headers) as r:
        assert r.status == 200
        async for line in r.content:
            if line.startswith(b"data: "):
                events.append(line[6:].strip().decode())
    return events


async def test_start_ready_and_serves(session: aiohttp.ClientSession,
                                      workers: list[Worker]) -> None:
    w = await make(session, workers)
    assert w.state.value is WorkerState.STOPPED
    await w.start(timeout=20)
    assert w.ready and w.alive and w.pid and w.port
    assert os.getpgid(w.pid) == w.pid  # its own process group
    async with session.get(w.base_url + "/health") as r:
        assert r.status == 200
    async with session.get(w.base_url + "/props") as r:
        assert r.status == 401  # the worker's own random key is required
    events = await stream_chat(session, w)
    assert events[-1] == "[DONE]"
    assert any("listening" in line for line in w.lines)  # stderr captured in the ring buffer
    await w.stop(drain=1, kill_after=5)
    assert w.state.value is WorkerState.STOPPED and not w.alive
    assert w.returncode == 0


async def _until(cond, timeout: float = 10.0) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def _requests_seen(w: Worker) -> int:
    return sum(1 for line in w.lines if line.startswith("request POST"))


async def test_output_is_read_when_idle_not_mid_request(
        session: aiohttp.ClientSession, workers: list[Worker],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """While a request is in flight the engine's lines wait in the pipe; they are read once
    the worker is idle, and nothing is lost."""
    from routerd.workers import process

    monkeypatch.setattr(process, "_HOLD_MAX", 3600.0)
    w = await make(session, workers)
    await w.start(timeout=20)
    w.begin()
    for _ in range(3):
        assert (await stream_chat(session, w))[-1] == "[DONE]"
    await asyncio.sleep(0.2)
    assert _requests_seen(w) == 0  # printed by the engine, still in the pipe
    w.end()
    await _until(lambda: _requests_seen(w) == 3)


async def test_output_is_read_when_any_request_ends(
        session: aiohttp.ClientSession, workers: list[Worker],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker that always has a request in flight still has its output read, at each
    request's end: a chatty engine under steady load must never block on a full pipe."""
    from routerd.workers import process

    monkeypatch.setattr(process, "_HOLD_MAX", 3600.0)
    w = await make(session, workers)
    await w.start(timeout=20)
    w.begin()  # the long-lived one
    try:
        for n in range(1, 4):
            w.begin()
            assert (await stream_chat(session, w))[-1] == "[DONE]"
            await asyncio.sleep(0.05)  # the engine's line is in the pipe by now
            w.end()
            await _until(lambda: _requests_seen(w) == n)
        assert w.inflight == 1
    finally:
        w.end()


async def test_output_of_a_long_request_is_read_periodically(
        session: aiohttp.ClientSession, workers: list[Worker],
        monkeypatch: pytest.MonkeyPatch) -> None:
    from routerd.workers import process

    monkeypatch.setattr(process, "_HOLD_MAX", 0.1)
    w = await make(session, workers)
    await w.start(timeout=20)
    w.begin()
    try:
        assert (await stream_chat(session, w))[-1] == "[DONE]"
        await _until(lambda: _requests_seen(w) == 1)  # still in flight: read on the timer
    finally:
        w.end()


async def test_crash_while_output_is_held_keeps_the_reason(
        session: aiohttp.ClientSession, workers: list[Worker],
        monkeypatch: pytest.MonkeyPatch) -> None:
    from routerd.workers import process

    monkeypatch.setattr(process, "_HOLD_MAX", 3600.0)
    w = await make(session, workers, "--crash-at-token", "2", "--tokens", "10")
    await w.start(timeout=20)
    w.begin()
    with contextlib.suppress(aiohttp.ClientError):
        await stream_chat(session, w)
    await asyncio.wait_for(w.exited(), 10)
    assert "crashing as asked" in w.stderr_tail(), w.stderr_tail()
    w.end()


async def test_start_twice_is_refused(session: aiohttp.ClientSession,
                                      workers: list[Worker]) -> None:
    w = await make(session, workers)
    await w.start(timeout=20)
    with pytest.raises(Exception, match="ready"):
        await w.start(timeout=20)


@pytest.mark.parametrize(("stderr", "oom"), [
    ("failed to allocate buffer: out of memory", True),
    ("error: unknown argument --frobnicate", False),
])
async def test_early_exit_carries_stderr(session: aiohttp.ClientSession, workers: list[Worker],
                                         stderr: str, oom: bool) -> None:
    w = await make(session, workers, "--exit-on-start", "3", "--stderr", stderr)
    t0 = time.monotonic()
    with pytest.raises(WorkerLoadError) as info:
        await w.start(timeout=30)
    assert time.monotonic() - t0 < 10  # seen at the exit, not at the load timeout
    err = info.value
    assert stderr in err.stderr and stderr in err.message
    assert "code 3" in err.message
    assert err.oom is oom
    assert w.state.value is WorkerState.FAILED and w.returncode == 3
    assert w.failure and stderr in w.failure


async def test_slow_start_within_timeout(session: aiohttp.ClientSession,
                                         workers: list[Worker]) -> None:
    w = await make(session, workers, "--slow-start", "1.0")
    await w.start(timeout=20)
    assert w.ready
    assert w.load_seconds >= 1.0


async def test_readiness_follows_the_engines_listening_line(
        session: aiohttp.ClientSession, workers: list[Worker],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """With the fallback poll stretched to 30 s, the worker is still found ready as soon as
    it prints "listening": the log line triggers the /health probe."""
    from routerd.workers import process

    monkeypatch.setattr(process, "_POLL_FIRST", 30.0)
    monkeypatch.setattr(process, "_POLL_MAX", 30.0)
    w = await make(session, workers, "--slow-start", "0.5")
    await asyncio.wait_for(w.start(timeout=60), 20)
    assert w.ready
    assert any("listening" in line for line in w.lines)


async def test_readiness_without_any_log_line_falls_back_to_polling(
        session: aiohttp.ClientSession, workers: list[Worker]) -> None:
    """An engine that prints nothing is found by the backoff poll."""
    w = await make(session, workers, "--slow-start", "0.3",
                   prefix=("sh", "-c", 'exec "$@" 2>/dev/null', "sh"))
    await w.start(timeout=20)
    assert w.ready and not w.lines


async def test_slow_start_beyond_timeout_fails_and_kills(session: aiohttp.ClientSession,
                                                         workers: list[Worker]) -> None:
    w = await make(session, workers, "--slow-start", "60")
    with pytest.raises(WorkerLoadError, match="did not become ready within"):
        await w.start(timeout=1.5)
    assert w.state.value is WorkerState.FAILED
    assert not w.alive and w.pid is not None and gone(w.pid)


async def test_stop_drains_in_flight_then_sigterm(session: aiohttp.ClientSession,
                                                  workers: list[Worker]) -> None:
    w = await make(session, workers, "--tokens", "15", "--token-delay", "0.05")
    await w.start(timeout=20)

    async def request() -> list[str]:
        w.begin()  # what Scheduler.acquire does for a request
        try:
            return await stream_chat(session, w)
        finally:
            w.end()

    task = asyncio.create_task(request())
    while w.inflight == 0:
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.1)  # let the stream get going; stop must still wait for it
    await w.stop(drain=20, kill_after=5)
    events = await asyncio.wait_for(task, 5)
    assert events[-1] == "[DONE]" and len(events) >= 15  # ran to its end
    assert w.returncode == 0  # SIGTERM, handled: a clean exit
    assert any("shutting down" in line for line in w.lines)


async def test_drain_is_bounded(session: aiohttp.ClientSession, workers: list[Worker]) -> None:
    w = await make(session, workers, "--tokens", "1000", "--token-delay", "0.05")
    await w.start(timeout=20)

    async def request() -> None:
        w.begin()
        try:
            await stream_chat(session, w)
        finally:
            w.end()

    task = asyncio.create_task(request())
    while w.inflight == 0:
        await asyncio.sleep(0.01)
    t0 = time.monotonic()
    await w.stop(drain=0.5, kill_after=5)
    assert time.monotonic() - t0 < 4
    assert not w.alive
    await asyncio.gather(task, return_exceptions=True)


async def test_sigkill_after_stop_timeout(session: aiohttp.ClientSession,
                                          workers: list[Worker]) -> None:
    w = await make(session, workers, "--ignore-sigterm")
    await w.start(timeout=20)
    t0 = time.monotonic()
    await w.stop(drain=0, kill_after=0.5)
    took = time.monotonic() - t0
    assert 0.5 <= took < 3, took
    assert w.returncode == -signal.SIGKILL
    assert w.state.value is WorkerState.STOPPED


async def test_whole_group_killed_incl_children(session: aiohttp.ClientSession,
                                                workers: list[Worker]) -> None:
    # the engine leaves a child behind (a helper, a shell's background job)
    prefix = ("sh", "-c", 'sleep 300 & echo "child=$!" >&2; exec "$@"', "sh")
    w = await make(session, workers, "--ignore-sigterm", prefix=prefix)
    await w.start(timeout=20)
    child = int(next(line for line in w.lines if line.startswith("child=")).split("=")[1])
    assert os.getpgid(child) == w.pid
    await w.stop(drain=0, kill_after=0.3)
    await wait_gone(child, 3)


async def test_crash_kills_leftover_children(session: aiohttp.ClientSession,
                                             workers: list[Worker]) -> None:
    prefix = ("sh", "-c", 'sleep 300 & echo "child=$!" >&2; exec "$@"', "sh")
    w = await make(session, workers, "--crash-at-token", "0", prefix=prefix)
    await w.start(timeout=20)
    child = int(next(line for line in w.lines if line.startswith("child=")).split("=")[1])
    with pytest.raises(aiohttp.ClientError):
        await stream_chat(session, w)
    await asyncio.wait_for(w.exited(), 5)
    assert w.state.value is WorkerState.FAILED and w.failure
    await wait_gone(child, 3)


async def test_kill_is_immediate(session: aiohttp.ClientSession, workers: list[Worker]) -> None:
    w = await make(session, workers, "--ignore-sigterm")
    await w.start(timeout=20)
    t0 = time.monotonic()
    await w.kill()
    assert time.monotonic() - t0 < 2
    assert w.returncode == -signal.SIGKILL and w.state.value is WorkerState.FAILED


async def test_crash_after_ready_calls_on_exit(session: aiohttp.ClientSession,
                                               workers: list[Worker]) -> None:
    seen: asyncio.Future[Worker] = asyncio.get_running_loop().create_future()
    w = Worker("fake", fake_argv(), session, on_exit=seen.set_result)
    workers.append(w)
    await w.start(timeout=20)
    assert w.pid
    os.kill(w.pid, signal.SIGKILL)
    assert await asyncio.wait_for(seen, 5) is w
    assert w.state.value is WorkerState.FAILED
    assert w.failure and "code -9" in w.failure


async def test_lifeline_closed_worker_exits(session: aiohttp.ClientSession,
                                            workers: list[Worker]) -> None:
    w = await make(session, workers, lifeline=True)
    await w.start(timeout=20)
    assert w._lifeline is not None
    os.close(w._lifeline)  # what the kernel does when the daemon dies, PDEATHSIG or not
    w._lifeline = None
    await asyncio.wait_for(w.exited(), 5)
    assert any("lifeline closed" in line for line in w.lines)


async def test_log_follow_then_end(session: aiohttp.ClientSession,
                                   workers: list[Worker]) -> None:
    w = await make(session, workers)
    await w.start(timeout=20)
    seen: list[str] = []

    async def follow() -> None:
        async for line in w.follow():
            seen.append(line)

    task = asyncio.create_task(follow())
    async with session.get(w.base_url + "/health"):
        pass
    await w.stop(drain=0, kill_after=5)
    await asyncio.wait_for(task, 5)  # the follow ends with the process
    assert any("listening" in line for line in seen)
    assert any("request GET /health" in line for line in seen)


PARENT = textwrap.dedent("""
    import asyncio, json, sys
    import aiohttp
    sys.path.insert(0, sys.argv[1])
    from routerd.workers.process import Worker
    from tests.workers.test_process import fake_argv

    async def main():
        async with aiohttp.ClientSession() as s:
            w = Worker("fake", fake_argv(lifeline=sys.argv[2] == "1"), s)
            await w.start(timeout=20)
            print("WORKER " + json.dumps({"pid": w.pid}), flush=True)
            await asyncio.sleep(600)

    asyncio.run(main())
""")


def _read_pid(parent: subprocess.Popen[bytes]) -> int:
    assert parent.stdout is not None
    for line in parent.stdout:
        if line.startswith(b"WORKER "):
            return int(json.loads(line[7:])["pid"])
    raise AssertionError(f"the parent exited with {parent.wait()}")


@pytest.mark.parametrize("lifeline", [False, True], ids=["pdeathsig", "pdeathsig+lifeline"])
async def test_worker_dies_with_a_sigkilled_parent(lifeline: bool) -> None:
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(ROOT), "1" if lifeline else "0"],
                              stdout=subprocess.PIPE, start_new_session=True)
    try:
        pid = await asyncio.wait_for(asyncio.to_thread(_read_pid, parent), 30)
        assert not gone(pid)
        parent.kill()
        took = await wait_gone(pid, 3)
        print(f"worker gone {took:.3f}s after its parent's SIGKILL")
    finally:
        parent.kill()
        parent.wait(5)
