"""Scenarios on the real model: warm request, streaming, concurrency, cold start, swap.

Every scenario runs the peers alternately (round i starts at peer i mod k), so a load spike
from a neighbour lands on every peer alike; rows carry paired differences and ratios."""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Callable, Sequence

import aiohttp

from . import client, procs
from .quiet import GATE
from .client import Target
from .results import Row, median

Measure = Callable[[Target], Awaitable[float]]


@dataclass
class RealPeers:
    direct: procs.Proc
    router: procs.Proc
    routerd: procs.Proc
    workdir: Path
    model: Path
    routerd_b: procs.Proc | None = None  # `--ab SRC`: routerd from another source tree

    def routerds(self) -> dict[str, procs.Proc]:
        out = {"routerd": self.routerd}
        if self.routerd_b is not None:
            out["routerd-B"] = self.routerd_b
        return out

    def targets(self, model: str = "smol-a", *, ollama: bool = True) -> list[Target]:
        hd = tuple(self.direct.headers.items())
        out = [Target("direct", self.direct.base_url, model, headers=hd),
               Target("router-mode", self.router.base_url, model)]
        for name, proc in self.routerds().items():
            out.append(Target(name, proc.base_url, model))
            if ollama:
                out.append(Target(f"{name} /api/chat", proc.base_url, model, "ollama"))
        return out


async def alternate(rounds: int, targets: Sequence[Target], fn: Measure, warmup: int = 1,
                    prime: Measure | None = None) -> dict[str, list[float]]:
    """Every round runs each peer once, in a fresh random order (seeded): a fixed cycle
    would always put the same peer after the same other process and bias it (caches).
    `prime`, when given, runs untimed just before each timed call to the same peer."""
    for _ in range(warmup):
        for t in targets:
            await fn(t)
    out: dict[str, list[float]] = {t.peer: [] for t in targets}
    rng = random.Random(len(targets) * 1000 + rounds)
    for _ in range(rounds):
        await GATE.wait()
        order = list(targets)
        rng.shuffle(order)
        for t in order:
            if prime is not None:
                await prime(t)
            out[t.peer].append(await fn(t))
    return out


def _vs(rows: list[Row], data: dict[str, list[float]]) -> list[Row]:
    for r in rows:
        r.compare(data.get("direct") if r.peer != "direct" else None,
                  data.get("router-mode") if r.peer not in ("direct", "router-mode") else None)
    return rows


# ------------------------------------------------------------------ warm


async def warm(peers: RealPeers, http: aiohttp.ClientSession, rounds: int) -> list[Row]:
    targets = peers.targets()
    def ask(t: Target) -> Awaitable[float]:
        return client.chat(http, t, n=8)

    # Primed: each timed request follows an untimed one to the same peer, so it never pays
    # for caches another server process just evicted.
    data = await alternate(rounds, targets, ask, warmup=3, prime=ask)
    rows = []
    for t in targets:
        ms = [x * 1e3 for x in data[t.peer]]
        data[t.peer] = ms
        row = Row("warm chat, 8 tokens", t.peer, "ms", ms)
        if t.peer.startswith("routerd"):
            row.target = "≤ +1 ms vs direct, faster than router mode"
        rows.append(row)
    for r in _vs(rows, data):
        if r.target:
            r.met = (r.vs_direct or 0) <= 1.0 and (r.vs_router or 0) < 0
    return rows


# ------------------------------------------------------------------ streaming


async def streaming(peers: RealPeers, http: aiohttp.ClientSession, rounds: int,
                    tokens: int) -> list[Row]:
    targets = peers.targets()
    stats: dict[str, list[client.StreamStats]] = {t.peer: [] for t in targets}
    cpu_us: dict[str, list[float]] = {t.peer: [] for t in targets}  # routerd CPU per token
    daemons = peers.routerds()

    async def one(t: Target) -> float:
        proc = daemons.get(t.peer.split(" ")[0])
        c0 = proc.cpu_seconds() if proc else 0.0
        s = await client.stream(http, t, n=tokens)
        if proc:
            cpu_us[t.peer].append((proc.cpu_seconds() - c0) / s.tokens * 1e6)
        stats[t.peer].append(s)
        return s.tokens_per_s

    def prime(t: Target) -> Awaitable[float]:
        # TTFT must not pay for another process's run (caches) nor for a prompt another
        # request just pushed out of the slot: prime with the same prompt.
        return client.chat(http, t, n=1, prompt=client.LONG_PROMPT)

    await alternate(rounds, targets, one, warmup=1, prime=prime)
    for t in targets:
        del stats[t.peer][0], cpu_us[t.peer][:1]  # the warm-up
    rate = {p: [s.tokens_per_s for s in v] for p, v in stats.items()}
    ttft = {p: [s.ttft * 1e3 for s in v] for p, v in stats.items()}
    rows: list[Row] = []
    for t in targets:
        n = median([s.tokens for s in stats[t.peer]])
        r1 = Row(f"stream {tokens} tokens: rate", t.peer, "tok/s", rate[t.peer], kind="ratio",
                 note=f"{n:.0f} tokens/stream")
        r2 = Row("stream: time to first token", t.peer, "ms", ttft[t.peer])
        if cpu_us[t.peer]:
            r1.extra["routerd_cpu_us_per_token"] = median(cpu_us[t.peer])
        if t.peer.startswith("routerd"):
            r1.target, r2.target = "≥ ×0.99 of direct", "≤ +1 ms vs direct"
        rows += [r1, r2]
    _vs([r for r in rows if r.unit == "tok/s"], rate)
    _vs([r for r in rows if r.unit == "ms"], ttft)
    for r in rows:
        if r.target and r.vs_direct is not None:
            r.met = r.vs_direct >= 0.99 if r.kind == "ratio" else r.vs_direct <= 1.0
    return rows


# ------------------------------------------------------------------ concurrency


async def concurrency(peers: RealPeers, http: aiohttp.ClientSession, rounds: int,
                      tokens: int, clients: int) -> list[Row]:
    targets = peers.targets()
    failed: dict[str, list[str]] = {t.peer: [] for t in targets}

    async def burst(t: Target) -> float:
        t0 = time.perf_counter()
        got = await asyncio.gather(*(client.stream(http, t, n=tokens) for _ in range(clients)),
                                   return_exceptions=True)
        failed[t.peer] += [str(g)[-120:] for g in got if isinstance(g, BaseException)]
        ok = [g for g in got if isinstance(g, client.StreamStats)]
        return sum(s.tokens for s in ok) / (time.perf_counter() - t0)

    data = await alternate(rounds, targets, burst, warmup=0)
    rows = []
    for t in targets:
        row = Row(f"{clients} concurrent streams (parallel {procs.PARALLEL}), aggregate",
                  t.peer, "tok/s", data[t.peer], kind="ratio")
        if failed[t.peer]:
            row.note = (f"{len(failed[t.peer])} of {rounds * clients} streams failed: "
                        f"{failed[t.peer][0]}")
        if t.peer.startswith("routerd"):
            row.target = "≥ ×0.98 of direct, no failed stream"
        rows.append(row)
    for r in _vs(rows, data):
        if r.target:
            r.met = (r.vs_direct or 0) >= 0.98 and not failed[r.peer]
    return rows


# ------------------------------------------------------------------ cold and swap


async def _post(http: aiohttp.ClientSession, url: str, body: dict[str, object]) -> int:
    async with http.post(url, data=json.dumps(body).encode(),
                         headers={"Content-Type": "application/json"}) as r:
        await r.read()
        return r.status


async def _routerd_unload_all(proc: procs.Proc, http: aiohttp.ClientSession) -> None:
    for m in ("smol-a", "smol-b"):
        await _post(http, proc.base_url + "/api/generate", {"model": m, "keep_alive": 0})


async def _router_unload_all(peers: RealPeers, http: aiohttp.ClientSession) -> None:
    for m in ("smol-a", "smol-b"):
        await _post(http, peers.router.base_url + "/models/unload", {"model": m})
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        states = [procs.router_status(peers.router, m) for m in ("smol-a", "smol-b")]
        if all(s == "unloaded" for s in states):
            return
        await asyncio.sleep(0.01)
    raise TimeoutError("router mode did not unload")


def ready_times(proc: procs.Proc, last: int) -> list[float]:
    """`load_s` (spawn → /health 200) of routerd's last `last` worker.ready log events."""
    out = []
    for line in proc.log_path.read_text(errors="replace").splitlines():
        if '"worker.ready"' in line:
            try:
                out.append(float(json.loads(line)["load_s"]))
            except (ValueError, KeyError):
                pass
    return out[-last:]


async def _by_hand(peers: RealPeers, http: aiohttp.ClientSession,
                   health: list[float]) -> float:
    """Start llama-server with routerd's flags, poll /health every 10 ms, then ask."""
    port, key = procs.free_port(), "bench-hand-key"
    argv = procs.routerd_argv(peers.model, port=port, api_key=key, alias="smol-a")
    t0 = time.perf_counter()
    proc = procs.spawn("by-hand", argv, peers.workdir, port,
                       headers={"Authorization": f"Bearer {key}"})
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                async with http.get(proc.base_url + "/health") as r:
                    await r.read()
                    if r.status == 200:
                        break
            except aiohttp.ClientConnectionError:
                pass
            if time.monotonic() > deadline or proc.popen.poll() is not None:
                raise RuntimeError(f"by-hand llama-server failed: {proc.log_tail()}")
            await asyncio.sleep(0.01)
        health.append(time.perf_counter() - t0)
        t = Target("by-hand", proc.base_url, "smol-a", headers=tuple(proc.headers.items()))
        await client.chat(http, t, n=8)
        return time.perf_counter() - t0
    finally:
        await asyncio.to_thread(proc.stop)


BY_HAND = "by hand (poll 10 ms)"


async def cold(peers: RealPeers, http: aiohttp.ClientSession, rounds: int) -> list[Row]:
    daemons = peers.routerds()
    data: dict[str, list[float]] = {**{p: [] for p in daemons}, "router-mode": [],
                                    BY_HAND: []}
    health: list[float] = []
    k = len(data)
    for i in range(rounds):
        await GATE.wait()
        order = list(data)
        for peer in order[i % k:] + order[:i % k]:
            if peer in daemons:
                await _routerd_unload_all(daemons[peer], http)
                t = Target(peer, daemons[peer].base_url, "smol-a")
                data[peer].append(await client.chat(http, t, n=8))
            elif peer == "router-mode":
                await _router_unload_all(peers, http)
                t = Target(peer, peers.router.base_url, "smol-a")
                data[peer].append(await client.chat(http, t, n=8))
            else:
                data[peer].append(await _by_hand(peers, http, health))
    rows = {p: Row("cold: first request, model unloaded (spawn + load + 8 tokens)", p, "s", xs)
            for p, xs in data.items()}
    for p, proc in daemons.items():
        rows[p].compare(data[BY_HAND], data["router-mode"])
        rows[p].extra["spawn_to_ready_s"] = median(ready_times(proc, rounds))
        rows[p].target = "≤ router mode's swap; ≤ +50 ms vs by hand"
        rows[p].note = "'vs direct' = vs starting llama-server by hand"
    rows["router-mode"].compare(data[BY_HAND], None)
    rows[BY_HAND].extra["spawn_to_ready_s"] = median(health)
    return list(rows.values())


async def swap(peers: RealPeers, http: aiohttp.ClientSession, rounds: int) -> list[Row]:
    """max_loaded 1 / --models-max 1: every request names the model that is not loaded."""
    urls = {p: d.base_url for p, d in peers.routerds().items()}
    urls["router-mode"] = peers.router.base_url
    targets = {p: [Target(p, u, m) for m in ("smol-a", "smol-b")] for p, u in urls.items()}
    for ts in targets.values():
        await client.chat(http, ts[1], n=8)  # smol-b loaded: the first timed request swaps
    data: dict[str, list[float]] = {p: [] for p in targets}
    k = len(targets)
    for i in range(rounds):
        await GATE.wait()
        order = list(targets)
        for p in order[i % k:] + order[:i % k]:
            data[p].append(await client.chat(http, targets[p][i % 2], n=8))
    rows = [Row("swap under max 1 loaded (evict + load + 8 tokens)", p, "s", xs)
            for p, xs in data.items()]
    for r in rows:
        if r.peer.startswith("routerd"):
            r.compare(None, data["router-mode"])
            r.target = "≤ router mode"
            r.met = (r.vs_router or 0) <= 0
    return rows


def finish_cold(rows: list[Row], swap_rows: list[Row]) -> None:
    """The cold target names router mode's swap: judge it once both ran."""
    swap_router = next((r for r in swap_rows if r.peer == "router-mode"), None)
    for r in rows:
        if not r.peer.startswith("routerd"):
            continue
        by_hand = (r.vs_direct or 0) <= 0.050
        r.met = by_hand and (swap_router is None or r.median <= swap_router.median)
        if swap_router is not None:
            r.extra["router_swap_s"] = swap_router.median


def stop_all(items: Sequence[procs.Proc | None]) -> None:
    for p in items:
        if p is not None:
            try:
                p.stop()
            except (OSError, subprocess.SubprocessError):
                pass
