"""The daemon's own life: SIGKILL (no orphans; the start-up sweep), SIGTERM/SIGINT (drain, then
exit 0; a second signal forces), SIGHUP (reload without touching what did not change)."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

import aiohttp
import psutil
import pytest

from tests.conftest import Daemon, fake_model
from tests.test_faults import (Stream, daemons, full_stream, http, is_error,  # noqa: F401
                               is_final, log_events, pid_gone, pid_of, ps, real_model, report,
                               stamp, wait_for)

pytestmark = pytest.mark.timeout(120)
SLOW = ("--tokens", "40", "--token-delay", "0.05")  # a 2 s stream


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


async def load(http: aiohttp.ClientSession, d: Daemon, model: str) -> int:
    async with http.post(d.base_url + "/api/generate", json={"model": model}) as r:
        assert r.status == 200, await r.text()
    return await pid_of(http, d, model)


async def wait_exit(d: Daemon, timeout: float) -> int:
    return await asyncio.to_thread(d.proc.wait, timeout)


# ---------------------------------------------------------------- SIGKILL and the sweep


@pytest.mark.engine
async def test_daemon_sigkill_leaves_no_worker(daemons: Callable[..., Daemon],
                                               http: aiohttp.ClientSession) -> None:
    models: dict[str, Any] = {"fake": fake_model(), "smol": real_model(parallel=1, ctx_size=512)}
    if importlib.util.find_spec("llama_cpp"):
        models["smol-lcp"] = real_model(backend="llama-cpp-python", parallel=1, ctx_size=512)
    d = daemons(models, timeouts={"request_idle": "60s", "probe_interval": "60s"})
    pids = {m: await load(http, d, m) for m in models}
    d.proc.kill()
    t0 = time.monotonic()
    gone_after = await wait_for(lambda: all(map(pid_gone, pids.values())), 3, "workers gone")
    report("daemon-sigkill workers-gone", seconds=gone_after, workers=len(pids))
    assert d.proc.wait(5) == -signal.SIGKILL
    # a new daemon on the same port serves at once
    d2 = daemons({"fake": fake_model()}, port=d.port)
    # A new client connection: `http` may still pool one to the killed daemon on this port
    # whose close it has not read yet (the daemon start above blocks this loop).
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as fresh:
        events = await full_stream(fresh, d2, "ollama-chat", "fake")
    assert is_final("ollama-chat", events[-1])
    report("daemon-sigkill new-daemon-serving", seconds=time.monotonic() - t0)


async def test_startup_sweep_kills_what_an_earlier_run_left(daemons: Callable[..., Daemon],
                                                            tmp_path: Path) -> None:
    # an "engine" from an earlier run, with a child, in its own process group
    orphan = subprocess.Popen(["sh", "-c", "sleep 300 & wait"], start_new_session=True)
    bystander = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        child = await wait_for(lambda: psutil.Process(orphan.pid).children(), 5, "child")
        kids = psutil.Process(orphan.pid).children()
        assert child is not None and kids
        state = tmp_path / "daemon0" / "state"  # where the daemons fixture puts the first one
        state.mkdir(parents=True)
        (state / "workers.json").write_text(json.dumps([
            {"pid": orphan.pid, "model": "old", "daemon": 1,
             "created": psutil.Process(orphan.pid).create_time()},
            # a recorded pid now used by another process (different start time): left alone
            {"pid": bystander.pid, "model": "reused", "daemon": 1,
             "created": psutil.Process(bystander.pid).create_time() - 1000},
        ]))
        t0 = time.monotonic()
        d = daemons({"fake": fake_model()})  # returns once it serves: the sweep came first
        assert orphan.poll() == -signal.SIGKILL
        assert all(pid_gone(k.pid) for k in kids)
        assert bystander.poll() is None
        assert [e["pid"] for e in log_events(d, "registry.orphan")] == [orphan.pid]
        report("startup-sweep", serving_after_s=time.monotonic() - t0)
    finally:
        for p in (orphan, bystander):
            p.kill()
            p.wait(5)


# ---------------------------------------------------------------- SIGTERM / SIGINT


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_stop_signal_drains_then_exits_0(daemons: Callable[..., Daemon],
                                               http: aiohttp.ClientSession,
                                               sig: signal.Signals) -> None:
    d = daemons({"fake": fake_model(*SLOW)}, timeouts={"drain": "20s"})
    async with Stream(http, d, "ollama-chat", "fake") as s:
        await s.until_text(3)
        pid = await pid_of(http, d, "fake")
        d.proc.send_signal(sig)
        t0 = time.monotonic()
        await wait_for(lambda: refused(d.port), 5, "listener closed")  # stops accepting
        assert not pid_gone(pid)  # workers stay while the drain runs
        events = await s.rest(timeout=20)
        drained = time.monotonic() - t0
    assert is_final("ollama-chat", events[-1]) and not any(map(is_error, events)), events[-3:]
    assert await wait_exit(d, 20) == 0, d.log()
    exited = time.monotonic() - t0
    assert pid_gone(pid)
    report(f"{sig.name} drain", stream_done_s=drained, daemon_exit_s=exited)


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
async def test_serves_and_stops_on_either_event_loop(daemons: Callable[..., Daemon],
                                                     http: aiohttp.ClientSession,
                                                     loop: str) -> None:
    """uvloop by default (a dependency); ROUTERD_LOOP=asyncio gives the standard loop. Either
    spawns and supervises workers (preexec_fn, pass_fds, the exit watcher) and streams."""
    env = {"ROUTERD_LOOP": "asyncio"} if loop == "asyncio" else {"ROUTERD_LOOP": ""}
    d = daemons({"fake": fake_model("--tokens", "5")}, env=env)
    events = await full_stream(http, d, "openai", "fake")
    assert is_final("openai", events[-1]) and not any(map(is_error, events)), events
    pid = await pid_of(http, d, "fake")
    d.proc.send_signal(signal.SIGTERM)
    assert await wait_exit(d, 20) == 0, d.log()
    assert pid_gone(pid)
    listening = log_events(d, "routerd.listening")
    assert listening and listening[0]["loop"] == loop, d.log()[-2000:]


async def test_drain_deadline_ends_streams_in_band(daemons: Callable[..., Daemon],
                                                    http: aiohttp.ClientSession) -> None:
    d = daemons({"fake": fake_model("--tokens", "2000", "--token-delay", "0.05")},
                timeouts={"drain": "1s", "stop": "1s"})
    async with Stream(http, d, "ollama-chat", "fake") as s:
        await s.until_text(3)
        pid = await pid_of(http, d, "fake")
        d.proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        events = await s.rest(timeout=10)
        ended = time.monotonic() - t0
    assert "shutting down" in events[-1]["error"], events[-3:]
    assert ended < 1 + 1 + 1, ended  # drain + the engine's own stop + slack
    assert await wait_exit(d, 10) == 0, d.log()
    assert pid_gone(pid)
    report("drain-deadline", stream_cut_in_band_s=ended, daemon_exit_s=time.monotonic() - t0)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_second_signal_forces_exit(daemons: Callable[..., Daemon],
                                         http: aiohttp.ClientSession,
                                         sig: signal.Signals) -> None:
    d = daemons({"fake": fake_model("--tokens", "2000", "--token-delay", "0.05")},
                timeouts={"drain": "60s"})
    async with Stream(http, d, "ollama-chat", "fake") as s:
        await s.until_text(3)
        pid = await pid_of(http, d, "fake")
        d.proc.send_signal(sig)
        await wait_for(lambda: refused(d.port), 5, "listener closed")
        d.proc.send_signal(sig)
        t0 = time.monotonic()
        code = await wait_exit(d, 3)
        forced = time.monotonic() - t0
        with pytest.raises(aiohttp.ClientError):  # the cut stream shows as one to the client
            await s.rest(timeout=5)
    assert code != 0
    gone = await wait_for(lambda: pid_gone(pid), 3, "worker killed")
    report(f"second {sig.name}", daemon_exit_s=forced, worker_gone_s=gone)


# ---------------------------------------------------------------- SIGHUP


async def test_sighup_reload(daemons: Callable[..., Daemon], http: aiohttp.ClientSession) -> None:
    slow = ("--tokens", "60", "--token-delay", "0.05")  # 3 s
    d = daemons({"same": fake_model(*slow), "removed": fake_model(*slow),
                 "changed": fake_model(*slow, "--reply", "old words")})
    names = ("same", "removed", "changed")
    streams = {m: Stream(http, d, "ollama-chat", m) for m in names}
    for s in streams.values():
        await s.__aenter__()
    try:
        for s in streams.values():
            await s.until_text(2)
        before = {m: await pid_of(http, d, m) for m in names}
        d.reload({"models": {"same": fake_model(*slow),
                             "changed": fake_model(*slow, "--reply", "new words"),
                             "added": fake_model("--reply", "I am new", preload=True)}})

        async def reloaded() -> bool:
            async with http.get(d.base_url + "/api/tags") as r:
                return "added" in {m["name"] for m in (await r.json())["models"]}

        await wait_for(reloaded, 5, "new model listed")
        async with http.post(d.base_url + "/api/chat", json={"model": "removed",
                                                             "messages": []}) as r:
            assert r.status == 404  # gone for new requests at once
        # a request for the changed model waits for the old worker to drain and stop, then
        # gets the new one: two copies never hold memory at once
        waiter = asyncio.create_task(full_stream(http, d, "ollama-chat", "changed"))
        finished = {m: await s.rest(timeout=20) for m, s in streams.items()}
        changed_first = await asyncio.wait_for(waiter, 20)
    finally:
        for s in streams.values():
            await s.__aexit__(None, None, None)
    for m, events in finished.items():  # every in-flight stream ran to its end
        assert is_final("ollama-chat", events[-1]) and not any(map(is_error, events)), (m, events)
    text = {m: "".join(e.get("message", {}).get("content", "") for e in ev)
            for m, ev in finished.items()}
    assert "old words" in text["changed"]
    assert await pid_of(http, d, "same") == before["same"]  # untouched
    await wait_for(lambda: pid_gone(before["removed"]) and pid_gone(before["changed"]), 5,
                   "removed and changed workers stopped after their streams")
    loaded = {m["name"] for m in (await ps(http, d))["models"]}
    assert "removed" not in loaded
    assert "new words" in "".join(e["message"]["content"] for e in changed_first)
    stopped = [stamp(e) for e in log_events(d, "worker.stopped") if e["pid"] == before["changed"]]
    spawned = [stamp(e) for e in log_events(d, "worker.spawned") if e["model"] == "changed"]
    assert len(spawned) == 2 and spawned[1] > stopped[0]
    assert await pid_of(http, d, "changed") != before["changed"]
    async def preloaded() -> bool:  # a new model marked preload loads without a request
        return "added" in {m["name"] for m in (await ps(http, d))["models"]}

    await wait_for(preloaded, 5, "new model preloaded")
    added = await full_stream(http, d, "ollama-chat", "added")
    assert "I am new" in "".join(e["message"]["content"] for e in added)
    assert await pid_of(http, d, "same") == before["same"]


async def test_sighup_with_a_broken_config_keeps_serving(daemons: Callable[..., Daemon],
                                                          http: aiohttp.ClientSession) -> None:
    d = daemons({"fake": fake_model()})
    pid = await load(http, d, "fake")
    d.config_path.write_text("models: [this is: not valid")
    d.proc.send_signal(signal.SIGHUP)
    await wait_for(lambda: log_events(d, "config.reload_failed"), 5, "reload refused")
    events = await full_stream(http, d, "ollama-chat", "fake")
    assert is_final("ollama-chat", events[-1])
    assert await pid_of(http, d, "fake") == pid
