"""Two models, room for one, 8 clients: swaps per minute and throughput with swap-aware
scheduling (swap_batch and min_resident at their defaults) against plain arrival order
(`swap_batch: 0`, `min_resident: 0`: a load waiting for room goes next, FIFO), in one run,
with the ratios. Two client patterns: each client alternating a, b, a, b ("alternating"), and
4 clients per model ("4 per model"). Fake workers whose load takes LOAD_S (`--slow-start`), so
a swap costs what loading a small model does, and an answer ANSWER_S; the figures are about
the scheduling, not an engine."""

from __future__ import annotations

import asyncio
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import aiohttp

from . import procs
from .quiet import GATE
from .results import Row, median

LOAD_S = 0.5
TOKENS, TOKEN_DELAY = 8, 0.005  # an answer: 8 tokens, 40 ms
CLIENTS = 8
PATTERNS = ("alternating", "4 per model")
SCENARIO = "alternation: 2 models, room for 1, 8 clients"


def config(fifo: bool) -> dict[str, Any]:
    flags = ("--slow-start", str(LOAD_S), "--tokens", str(TOKENS),
             "--token-delay", str(TOKEN_DELAY))
    entry = {"backend": "command", "parallel": 4, "command": procs.fake_command(*flags)}
    top: dict[str, Any] = {"max_loaded": 1, "keep_alive": "1h", "max_queue": 256,
                           "models": {"a": entry, "b": entry}}
    if fifo:
        top.update(swap_batch=0, min_resident=0)
    return top


@contextmanager
def peers(workdir: Path) -> Iterator[dict[str, procs.Proc]]:
    started: dict[str, procs.Proc] = {}
    try:
        started["swap-aware"] = procs.start_routerd(workdir, config(False), "routerd-swaps")
        started["FIFO"] = procs.start_routerd(workdir, config(True), "routerd-fifo")
        yield started
    finally:
        for p in started.values():
            p.stop()


async def _loads(http: aiohttp.ClientSession, base: str) -> int:
    async with http.get(base + "/metrics") as r:
        text = await r.text()
    return int(sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("routerd_model_loads_total{")))


async def one_run(http: aiohttp.ClientSession, base: str, pattern: str,
                  seconds: float) -> tuple[float, float, float]:
    """(swaps per minute, requests per second, the longest wait in s) for one pattern."""
    before = await _loads(http, base)
    done, waits = 0, []
    stop_at = time.monotonic() + seconds

    async def client(i: int) -> None:
        nonlocal done
        k = 0
        while time.monotonic() < stop_at:
            model = "ab"[(i + k) % 2] if pattern == "alternating" else "ab"[i % 2]
            body = {"model": model, "messages": [{"role": "user", "content": "hi"}],
                    "max_tokens": TOKENS}
            t0 = time.monotonic()
            async with http.post(base + "/v1/chat/completions", json=body) as r:
                await r.read()
                if r.status == 200:
                    done += 1
            waits.append(time.monotonic() - t0)
            k += 1

    t0 = time.monotonic()
    await asyncio.gather(*(client(i) for i in range(CLIENTS)))
    elapsed = time.monotonic() - t0
    swaps = await _loads(http, base) - before
    return swaps * 60 / elapsed, done / elapsed, max(waits, default=0.0)


async def alternation(workdir: Path, rounds: int, seconds: float) -> list[Row]:
    data: dict[tuple[str, str, str], list[float]] = {}
    timeout = aiohttp.ClientTimeout(total=300)
    with peers(workdir) as started:
        async with aiohttp.ClientSession(timeout=timeout) as http:
            for base in (p.base_url for p in started.values()):  # a loaded, warm
                async with http.post(base + "/v1/chat/completions", json={
                        "model": "a", "messages": [{"role": "user", "content": "hi"}]}) as r:
                    await r.read()
            names = list(started)
            for i in range(rounds):
                for pattern in PATTERNS:
                    await GATE.wait()
                    for name in names[i % 2:] + names[:i % 2]:  # alternate who goes first
                        swaps, rps, worst = await one_run(http, started[name].base_url,
                                                          pattern, seconds)
                        for what, v in (("swaps/min", swaps), ("req/s", rps),
                                        ("longest wait", worst)):
                            data.setdefault((pattern, name, what), []).append(v)
    return rows(data, rounds, seconds)


def rows(data: dict[tuple[str, str, str], list[float]], rounds: int,
         seconds: float) -> list[Row]:
    out = []
    note = (f"{rounds}×{seconds:g} s per peer; fake engine: load {LOAD_S:g} s, "
            f"answer {TOKENS}×{TOKEN_DELAY * 1000:g} ms")
    units = {"swaps/min": "swaps/min", "req/s": "req/s", "longest wait": "s"}
    for pattern in PATTERNS:
        for what in ("swaps/min", "req/s", "longest wait"):
            for name in ("swap-aware", "FIFO"):
                xs = data.get((pattern, name, what), [])
                out.append(Row(f"{SCENARIO} ({pattern}): {what}", f"routerd {name}",
                               units[what], xs, note=note))
        for what, label in (("req/s", "throughput"), ("swaps/min", "swaps per minute")):
            a, b = data.get((pattern, "swap-aware", what), []), data.get((pattern, "FIFO", what), [])
            ratios = [x / y for x, y in zip(a, b) if y]
            out.append(Row(f"{SCENARIO} ({pattern}): {label}, swap-aware ÷ FIFO",
                           "routerd", "×", ratios, kind="ratio",
                           note=f"paired per round; median {median(ratios):.2f}×"))
    return out
