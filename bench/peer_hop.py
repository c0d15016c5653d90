"""The "peer" scenario: what a peer hop adds. routerd B serves a model; routerd A has no
model and B as its peer. Warm non-streamed chats alternate between B directly and B through
A in one run; the row gives A's time, the paired difference and the paired ratio against
calling B directly. Twice: B serving the real model (8 tokens, temperature 0: what a user
sees) and B serving the fake worker (no generation: the hop's own cost, which generation
noise hides in the first).

`python -m bench --only peer` runs it alone."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import aiohttp

from . import procs
from .capacity import FAST_FLAGS
from .client import TIMEOUT
from .quiet import GATE
from .results import Row, median

SCENARIO = "peer hop: warm chat, 8 tokens (routerd A → peer routerd B vs B directly)"
FAKE = "peer hop: fake engine, the hop alone (routerd A → peer routerd B vs B directly)"


async def _chat(http: aiohttp.ClientSession, base: str, model: str = "smol-a") -> float:
    body = {"model": model, "max_tokens": 8, "temperature": 0,
            "messages": [{"role": "user", "content": "Say hello."}]}
    t0 = time.perf_counter()
    async with http.post(base + "/v1/chat/completions", data=json.dumps(body).encode(),
                         headers={"Content-Type": "application/json"}, timeout=TIMEOUT) as r:
        raw = await r.read()
        if r.status != 200:
            raise RuntimeError(f"{base}: HTTP {r.status}: {raw[:300]!r}")
    return (time.perf_counter() - t0) * 1000


async def peer_hop(workdir: Path, model: Path, rounds: int) -> list[Row]:
    entry = {"model": str(model), "backend": "llama-server", "ctx_size": procs.CTX_SIZE,
             "parallel": 1}
    fake = {"backend": "command", "command": procs.fake_command(*FAST_FLAGS)}
    return [*await _pair(workdir, "smol-a", entry, rounds, SCENARIO, "peer"),
            *await _pair(workdir, "fake", fake, rounds * 5, FAKE, "peer-fake")]


async def _pair(workdir: Path, name: str, entry: dict[str, Any], rounds: int, scenario: str,
                tag: str) -> list[Row]:
    b = a = None
    try:
        b = procs.start_routerd(workdir, {"keep_alive": "1h", "models": {name: entry}},
                                f"{tag}-b")
        config: dict[str, Any] = {"peers": [{"name": "b", "url": b.base_url, "kind": "routerd",
                                             "interval": "1s"}]}
        a = procs.start_routerd(workdir, config, f"{tag}-a")
        async with aiohttp.ClientSession() as http:
            for _ in range(100):  # A's first poll of B
                async with http.get(a.base_url + "/v1/models") as r:
                    if any(m["id"] == name for m in (await r.json())["data"]):
                        break
                time.sleep(0.1)
            for _ in range(3):  # warm: B's model loaded, connections open
                await _chat(http, b.base_url, name)
                await _chat(http, a.base_url, name)
            direct, hop = [], []
            for i in range(rounds):
                await GATE.wait()
                pair = [(direct, b.base_url), (hop, a.base_url)]
                for xs, base in pair if i % 2 == 0 else pair[::-1]:
                    xs.append(await _chat(http, base, name))
    finally:
        for p in (a, b):
            if p is not None:
                p.stop()
    row = Row(scenario, "routerd A → peer B", "ms", hop).compare(direct, None)
    row.extra["x_vs_direct"] = median([h / d for h, d in zip(hop, direct) if d])
    row.note = f"×{row.extra['x_vs_direct']:.3f} of calling B directly (paired median)"
    return [Row(scenario, "routerd B directly", "ms", direct), row]
