"""Routing capacity and daemon footprint, against the fake worker (an instant upstream).

routerd here serves 50 configured fake models: `fast` (instant answers), `slow` (one token a
second, for the open-streams footprint) and 48 never-loaded fillers."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import psutil

from . import client, loadgen, procs
from .quiet import GATE
from .results import Row, median, quantile

MiB = 1024 * 1024
FAST_FLAGS = ("--reply", "Hello from the fake worker, eight tokens.")
SLOW_FLAGS = ("--tokens", "100000", "--token-delay", "1.0")


def fake_config(parallel: int, streams: int) -> dict[str, Any]:
    models: dict[str, Any] = {
        "fast": {"backend": "command", "parallel": parallel,
                 "command": procs.fake_command(*FAST_FLAGS)},
        "slow": {"backend": "command", "parallel": streams + 16,
                 "command": procs.fake_command(*SLOW_FLAGS)},
    }
    for i in range(48):
        models[f"filler-{i:02d}"] = {"backend": "command", "command": procs.fake_command()}
    return {"max_queue": 4 * streams + 64, "keep_alive": "1h", "models": models}


@dataclass
class FakePeers:
    routerd: procs.Proc
    direct: procs.Proc  # the same fake worker, started by hand
    routerd_b: procs.Proc | None = None

    def routerds(self) -> dict[str, procs.Proc]:
        out = {"routerd": self.routerd}
        if self.routerd_b is not None:
            out["routerd-B"] = self.routerd_b
        return out

    def body(self) -> dict[str, Any]:
        return {"model": "fast", "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 8, "stream": False}


def _ollama_body() -> dict[str, Any]:
    return {"model": "fast", "messages": [{"role": "user", "content": "hi"}], "stream": False,
            "options": {"num_predict": 8}}


def _cpu(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
    return total


@dataclass(frozen=True)
class Case:
    name: str
    url: str
    body: dict[str, Any]
    headers: dict[str, str]
    daemon: procs.Proc | None  # the routerd in the path (None: the worker hit directly)


def _cases(peers: FakePeers) -> list[Case]:
    d = peers.direct
    out = [Case("direct (fake worker)", d.base_url + "/v1/chat/completions", peers.body(),
                d.headers, None)]
    for name, r in peers.routerds().items():
        out += [Case(name, r.base_url + "/v1/chat/completions", peers.body(), {}, r),
                Case(f"{name} /api/chat", r.base_url + "/api/chat", _ollama_body(), {}, r)]
    return out


async def _load_fast(peers: FakePeers) -> dict[int, list[int]]:
    """Load `fast` in every routerd; their worker pids, by routerd pid."""
    async with client.session() as http:
        for r in peers.routerds().values():
            await client.chat(http, client.Target("routerd", r.base_url, "fast"))
    out = {r.pid: procs.worker_pids(r) for r in peers.routerds().values()}
    out[0] = [peers.direct.pid]
    return out


async def capacity(peers: FakePeers, rounds: int, seconds: float,
                   connections: int) -> list[Row]:
    """Alternate: fake worker hit directly, routerd /v1 (bytes relayed), routerd /api/chat
    (translated). CPU seconds per request of routerd itself, and of the worker behind it."""
    cases = _cases(peers)
    workers = await _load_fast(peers)
    names = [c.name for c in cases]
    rps: dict[str, list[float]] = {n: [] for n in names}
    lat: dict[str, list[float]] = {n: [] for n in names}
    cpu_req: dict[str, list[float]] = {n: [] for n in names}
    wcpu_req: dict[str, list[float]] = {n: [] for n in names}
    gen_req: dict[str, list[float]] = {n: [] for n in names}
    k = len(cases)
    for i in range(rounds):
        await GATE.wait()
        for c in [*cases[i % k:], *cases[:i % k]]:
            mine = [c.daemon.pid] if c.daemon else []
            theirs = workers[c.daemon.pid if c.daemon else 0]
            res = await loadgen.run(c.url, c.body, c.headers, connections=connections,
                                    seconds=seconds, probes={"routerd": lambda: _cpu(mine),
                                                             "worker": lambda: _cpu(theirs)})
            if res.errors or not res.requests:
                raise RuntimeError(f"capacity {c.name}: {res.errors} errors, "
                                   f"{res.requests} answers")
            rps[c.name].append(res.rps)
            lat[c.name] += res.latencies
            n = max(res.requests, 1)
            cpu_req[c.name].append(res.probes["routerd"] / n * 1e3)
            wcpu_req[c.name].append(res.probes["worker"] / n * 1e3)
            gen_req[c.name].append(res.client_cpu / n * 1e3)
    return _capacity_rows(rps, lat, cpu_req, wcpu_req, gen_req, connections)


async def added_latency(peers: FakePeers, rounds: int, seconds: float) -> list[Row]:
    """One connection, one request at a time: routerd's own added latency, without the
    model's jitter (median per round, paired against the fake worker hit directly)."""
    cases = _cases(peers)
    await _load_fast(peers)
    p50: dict[str, list[float]] = {c.name: [] for c in cases}
    k = len(cases)
    for i in range(rounds):
        await GATE.wait()
        for c in [*cases[i % k:], *cases[:i % k]]:
            res = await loadgen.run(c.url, c.body, c.headers, connections=1, seconds=seconds,
                                    warmup=0.2)
            p50[c.name].append(quantile(res.latencies, 0.5) * 1e3)
    rows = []
    direct = p50["direct (fake worker)"]
    for name, xs in p50.items():
        row = Row("added latency, instant upstream, 1 connection (p50 per round)", name, "ms",
                  xs)
        if name.startswith("routerd"):
            row.compare(direct, None)
            row.target = "≤ +1 ms (routerd's own share of the warm-request target)"
            row.met = (row.vs_direct or 0) <= 1.0
        rows.append(row)
    return rows


def _capacity_rows(rps: dict[str, list[float]], lat: dict[str, list[float]],
                   cpu_req: dict[str, list[float]], wcpu_req: dict[str, list[float]],
                   gen_req: dict[str, list[float]], connections: int) -> list[Row]:
    direct = rps["direct (fake worker)"]
    rows = []
    for name in rps:
        row = Row(f"routing capacity, instant upstream, {connections} connections", name,
                  "req/s", rps[name], kind="ratio")
        row.extra = {"p50_ms": quantile(lat[name], 0.5) * 1e3,
                     "p99_ms": quantile(lat[name], 0.99) * 1e3,
                     "worker_cpu_ms_per_req": median(wcpu_req[name]),
                     "loadgen_cpu_ms_per_req": median(gen_req[name])}
        if name.startswith("routerd"):
            cpu = median(cpu_req[name])
            row.extra["routerd_cpu_ms_per_req"] = cpu
            row.extra["routerd_ceiling_rps"] = 1e3 / cpu if cpu else 0.0
            row.target = "≥ 2,000 req/s"
            row.met = row.median >= 2000
            row.compare(direct, None)
        rows.append(row)
    return rows


# ------------------------------------------------------------------ footprint


async def open_streams(peers: FakePeers, count: int, batch: int = 50,
                       timeout: float = 60) -> Row:
    """`count` streams held open through routerd to the slow fake model (opened `batch` at a
    time, each batch once the previous one streams); routerd's RSS with all of them open."""
    r = peers.routerd
    body = {"model": "slow", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    loop = asyncio.get_running_loop()
    async with client.session() as http:
        await client.chat(http, client.Target("routerd", r.base_url, "fast"))

        async def one(first: asyncio.Future[None]) -> None:
            async with http.post(r.base_url + "/v1/chat/completions", json=body) as resp:
                if resp.status != 200:
                    raise RuntimeError(f"stream {resp.status}: {await resp.text()}")
                await resp.content.readline()
                first.set_result(None)
                async for _ in resp.content:
                    pass

        before = r.rss()
        tasks: list[asyncio.Task[None]] = []
        try:
            for start in range(0, count, batch):
                firsts = [loop.create_future() for _ in range(min(batch, count - start))]
                tasks += [asyncio.create_task(one(f)) for f in firsts]
                _, pending = await asyncio.wait(firsts, timeout=timeout)
                broken = [t for t in tasks if t.done()]
                if pending or broken:
                    why = next((repr(t.exception()) for t in broken if t.exception()), "")
                    raise RuntimeError(f"{len(tasks) - len(pending) - len(broken)} of "
                                       f"{count} streams open, then: {why or 'timeout'}")
            await asyncio.sleep(2.0)  # a couple of tokens through every stream
            during = r.rss()
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    row = Row("daemon RSS", f"routerd, {count} open streams", "MiB", [during / MiB])
    row.extra = {"before_mib": before / MiB, "per_stream_kib": (during - before) / count / 1024}
    row.note = f"+{(during - before) / count / 1024:.1f} KiB per open stream"
    return row


def rss_row(peer: str, proc: procs.Proc, note: str = "") -> Row:
    return Row("daemon RSS", peer, "MiB", [proc.rss() / MiB], note=note)


@contextlib.contextmanager
def fake_peers(workdir: Path, parallel: int, streams: int,
               ab: str | None = None) -> Iterator[FakePeers]:
    routerd = direct = routerd_b = None
    try:
        config = fake_config(parallel, streams)
        routerd = procs.start_routerd(workdir, config, "routerd-fake")
        if ab is not None:
            routerd_b = procs.start_routerd(workdir, config, "routerd-fake-B", src=ab)
        direct = procs.start_fake_worker(workdir, *FAST_FLAGS)
        yield FakePeers(routerd, direct, routerd_b)
    finally:
        for p in (routerd, routerd_b, direct):
            if p is not None:
                p.stop()

