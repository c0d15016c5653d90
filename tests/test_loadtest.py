"""A bounded load test over loopback: 500 concurrent streaming clients against fake workers.

No errors beyond 503s (each with Retry-After), and nothing leaks: the daemon's file
descriptors and connections come back to where they were, no lease or queue entry is left,
and (in process) no asyncio task outlives the burst. Figures are printed as `LOAD ...` lines.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import aiohttp
import psutil
import pytest
from aiohttp.test_utils import TestServer

from routerd.app import make_app
from routerd.config import parse_config
from tests.conftest import Daemon, fake_model
from tests.test_faults import daemons, ps, wait_for  # noqa: F401

pytestmark = pytest.mark.timeout(120)
CLIENTS = 500
TOKENS = ("--tokens", "16", "--token-delay", "0.005")  # an 80 ms stream
USER = [{"role": "user", "content": "hi"}]


@dataclass
class Outcome:
    status: int
    seconds: float
    complete: bool = False
    retry_after: str | None = None
    error: str | None = None


async def one(session: aiohttp.ClientSession, base: str, i: int) -> Outcome:
    """Alternate dialects and models: Ollama NDJSON and OpenAI SSE, on `a` and `b`."""
    model = "a" if i % 2 else "b"
    openai = i % 4 >= 2
    path = "/v1/chat/completions" if openai else "/api/chat"
    t0 = time.monotonic()
    try:
        async with session.post(base + path, json={"model": model, "messages": USER,
                                                   "stream": True}) as r:
            if r.status != 200:
                await r.read()
                return Outcome(r.status, time.monotonic() - t0,
                               retry_after=r.headers.get("Retry-After"))
            lines = [line.strip() async for line in r.content if line.strip()]
    except aiohttp.ClientError as e:
        return Outcome(0, time.monotonic() - t0, error=repr(e))
    last = lines[-1]
    done = last == b"data: [DONE]" if openai else json.loads(last).get("done") is True
    errors = [x for x in lines if b'"error"' in x]
    return Outcome(200, time.monotonic() - t0, complete=done and not errors,
                   error=errors[0].decode() if errors else None)


async def burst(base: str, n: int = CLIENTS) -> tuple[list[Outcome], float]:
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        t0 = time.monotonic()
        outcomes = await asyncio.gather(*(one(session, base, i) for i in range(n)))
        wall = time.monotonic() - t0
    return list(outcomes), wall


def summary(label: str, outcomes: list[Outcome], wall: float) -> dict[str, Any]:
    ok = [o.seconds for o in outcomes if o.status == 200]
    busy = [o for o in outcomes if o.status == 503]
    lat = sorted(ok)
    stats = {"ok": len(ok), "503": len(busy), "wall_s": round(wall, 2),
             "req_per_s": round(len(outcomes) / wall, 1),
             "ok_per_s": round(len(ok) / wall, 1),
             "p50_ms": round(statistics.median(lat) * 1000, 1) if lat else None,
             "p99_ms": round(lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000, 1)
             if lat else None}
    print("LOAD", label, " ".join(f"{k}={v}" for k, v in stats.items()), flush=True)
    return stats


def check_outcomes(outcomes: list[Outcome]) -> None:
    bad = [o for o in outcomes if o.status not in (200, 503) or o.error
           or (o.status == 200 and not o.complete)]
    assert not bad, bad[:5]
    assert all(o.retry_after for o in outcomes if o.status == 503)


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def client_connections(pid: int, port: int) -> int:
    return sum(1 for c in psutil.Process(pid).net_connections("tcp")
               if c.laddr and c.laddr.port == port and c.status != psutil.CONN_LISTEN)


def models(parallel_a: int, parallel_b: int) -> dict[str, Any]:
    return {"a": fake_model(*TOKENS, parallel=parallel_a),
            "b": fake_model(*TOKENS, parallel=parallel_b)}


async def settle(d: Daemon, http: aiohttp.ClientSession) -> int:
    """Wait for the burst's connections to close and its leases to be returned; the fds."""
    pid = d.proc.pid
    await wait_for(lambda: client_connections(pid, d.port) <= 1, 10, "client connections closed")

    async def idle() -> bool:
        view = await ps(http, d)
        return view["routerd"]["queue"] == 0 and all(
            m["routerd"]["in_use"] == 0 for m in view["models"])

    await wait_for(idle, 10, "leases returned")
    return fds(pid)


@pytest.mark.parametrize("max_queue", [1000, 24], ids=["queue-large", "queue-small"])
async def test_500_streaming_clients(daemons: Callable[..., Daemon], max_queue: int) -> None:
    # not a probe test: a fake worker at full tilt on busy cores may answer /health late
    d = daemons(models(4, 8), max_queue=max_queue, log_level="warning",
                timeouts={"probe_timeout": "5s", "request_idle": "30s"})
    async with aiohttp.ClientSession() as http:
        warm, _ = await burst(d.base_url, 4)  # both models loaded, pools warm
        check_outcomes(warm)
        fd0 = await settle(d, http)
        outcomes, wall = await burst(d.base_url)
        stats = summary(f"max_queue={max_queue} burst1", outcomes, wall)
        check_outcomes(outcomes)
        fd1 = await settle(d, http)
        outcomes, wall = await burst(d.base_url)
        summary(f"max_queue={max_queue} burst2", outcomes, wall)
        check_outcomes(outcomes)
        fd2 = await settle(d, http)
    print(f"LOAD max_queue={max_queue} fds before={fd0} after1={fd1} after2={fd2}", flush=True)
    if max_queue >= CLIENTS:
        assert stats["503"] == 0 and stats["ok"] == CLIENTS
    else:
        assert stats["503"] > 0 and stats["ok"] >= 4 + 8  # the slots and the queue were served
    # pooled keep-alive connections to the workers (at most one per slot) may stay open
    assert fd1 - fd0 <= 4 + 8 + 4, (fd0, fd1)
    assert fd2 - fd1 <= 4, (fd1, fd2)  # a second burst leaks nothing more


# ---------------------------------------------------------------- tasks, in process


@pytest.fixture
async def inprocess(tmp_path: Path) -> AsyncIterator[str]:
    config = parse_config({"host": "127.0.0.1", "port": 0, "state_dir": str(tmp_path / "state"),
                           "models_dir": str(tmp_path / "models"), "max_queue": 1000,
                           "memory": {"ram_budget": "90%", "gpus": []},
                           "models": models(4, 4)})
    server = TestServer(make_app(config), host="127.0.0.1")
    await server.start_server()
    try:
        yield str(server.make_url("")).rstrip("/")
    finally:
        await server.close()


async def test_no_task_outlives_a_burst(inprocess: str) -> None:
    warm, _ = await burst(inprocess, 4)
    check_outcomes(warm)
    await asyncio.sleep(0)
    before = len(asyncio.all_tasks())
    outcomes, wall = await burst(inprocess, 200)
    summary("in-process 200", outcomes, wall)
    check_outcomes(outcomes)

    def settled() -> bool:
        return len(asyncio.all_tasks()) <= before

    await wait_for(settled, 10, f"tasks back to {before}")
