"""The "cache" scenario: time to first token of a conversation returning to its model after
a swap. Two names for the real model, room for one: a ~2,700-token conversation on smol-a,
one request on smol-b (smol-a is evicted), then the next turn on smol-a, timed (its load,
the restore, the prompt, the first token). Peers: routerd keeping prompt caches (the default),
routerd with `keep_cache: false`, and llama-server's router mode (`--models-max 1`), which
cannot restore a slot. The engine's own `timings.cache_n` of the returning turn is recorded.

`python -m bench --only cache` runs it alone."""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, cast

import aiohttp

from . import procs
from .client import TIMEOUT
from .quiet import GATE
from .results import Row, median

CTX, NOTES = 4096, 135  # 2,710 tokens of history (the first turn's prompt_n)
SCENARIO = "cache: returning conversation after a swap, TTFT (2,700-token history)"
CACHED, NO_CACHE, ROUTER = "routerd (prompt cache)", "routerd keep_cache: false", "router-mode"


def history(round_: int) -> list[dict[str, str]]:
    # Each round its own conversation: nothing from an earlier round can be reused.
    text = " ".join(f"Note {i}: the weather in town {(i * 7 + round_) % 17} was mild on day "
                    f"{i + round_}." for i in range(NOTES))
    return [{"role": "user", "content": text + "\nWhich town is mentioned most?"}]


def routerd_config(model: Path, keep: bool) -> dict[str, Any]:
    entry = {"model": str(model), "backend": "llama-server", "ctx_size": CTX, "parallel": 1,
             "embeddings": False, "keep_cache": keep}
    return {"max_loaded": 1, "keep_alive": "1h", "models": {"smol-a": entry, "smol-b": entry}}


def start_router(workdir: Path, model: Path) -> procs.Proc:
    mdir = workdir / "cache-router-models"
    mdir.mkdir(exist_ok=True)
    for name in ("smol-a", "smol-b"):
        link = mdir / f"{name}.gguf"
        if not link.exists():
            link.symlink_to(model)
    flags = procs.shared_flags(model)
    for flag, value in (("-c", str(CTX)), ("-np", "1")):
        flags[flags.index(flag) + 1] = value
    if "--embedding" in flags:  # as routerd's entries here: no embeddings
        i = flags.index("--embedding")
        del flags[i:i + 3]  # --embedding --pooling mean
    port = procs.free_port()
    argv = [str(procs.BIN / "llama-server"), "--models-dir", str(mdir), "--models-max", "1",
            "--host", "127.0.0.1", "--port", str(port), *flags]
    proc = procs.spawn("cache-router-mode", argv, workdir, port)
    procs.wait_http(proc, "/health")
    return proc


@contextmanager
def peers(workdir: Path, model: Path) -> Iterator[dict[str, procs.Proc]]:
    started: dict[str, procs.Proc] = {}
    try:
        started[CACHED] = procs.start_routerd(workdir, routerd_config(model, True),
                                              "routerd-cache")
        started[NO_CACHE] = procs.start_routerd(workdir, routerd_config(model, False),
                                                "routerd-nocache")
        started[ROUTER] = start_router(workdir, model)
        yield started
    finally:
        for p in started.values():
            p.stop()


async def _ask(http: aiohttp.ClientSession, base: str, model: str,
               messages: list[dict[str, str]], *, n: int = 4) -> tuple[float, dict[str, Any]]:
    """Stream one answer: (seconds to the first content chunk, the last chunk's timings)."""
    body = {"model": model, "messages": messages, "max_tokens": n, "temperature": 0,
            "stream": True}
    t0 = time.perf_counter()
    first = 0.0
    said, timings = "", cast(dict[str, Any], {})
    async with http.post(base + "/v1/chat/completions", data=json.dumps(body).encode(),
                         headers={"Content-Type": "application/json"}, timeout=TIMEOUT) as r:
        if r.status != 200:
            raise RuntimeError(f"{model}: {r.status} {(await r.text())[:300]}")
        async for raw in r.content:
            line = raw.strip()
            if not line.startswith(b"data:") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            for c in chunk.get("choices", []):
                piece = (c.get("delta") or {}).get("content")
                if piece:
                    if not first:
                        first = time.perf_counter() - t0
                    said += piece
            timings = chunk.get("timings") or timings
    return first or time.perf_counter() - t0, {"said": said, **timings}


async def one_round(http: aiohttp.ClientSession, base: str, round_: int) -> tuple[float, int]:
    msgs = history(round_)
    _, first = await _ask(http, base, "smol-a", msgs)
    await _ask(http, base, "smol-b", [{"role": "user", "content": "Say hello."}])
    again = [*msgs, {"role": "assistant", "content": first["said"]},
             {"role": "user", "content": "And the least?"}]
    ttft, t = await _ask(http, base, "smol-a", again)
    return ttft, int(t.get("cache_n", -1))


async def cache(workdir: Path, model: Path, rounds: int) -> list[Row]:
    data: dict[str, list[float]] = {CACHED: [], NO_CACHE: [], ROUTER: []}
    reused: dict[str, list[int]] = {p: [] for p in data}
    with peers(workdir, model) as started:
        async with aiohttp.ClientSession() as http:
            k = len(data)
            for i in range(rounds):
                await GATE.wait()
                order = list(data)
                for p in order[i % k:] + order[:i % k]:
                    ttft, n = await one_round(http, started[p].base_url, i)
                    data[p].append(ttft)
                    reused[p].append(n)
    rows = {p: Row(SCENARIO, p, "s", xs, note=f"engine's cache_n {median(reused[p]):.0f}")
            for p, xs in data.items()}
    mine = rows[CACHED]
    mine.compare(None, data[ROUTER])
    for p, r in rows.items():
        r.extra["cache_n"] = median(reused[p])
    for other, key in ((NO_CACHE, "x_vs_keep_cache_false"), (ROUTER, "x_vs_router_mode")):
        ratios = [b / a for a, b in zip(data[CACHED], data[other]) if a]
        mine.extra[key] = median(ratios)
    mine.target = "≥ ×5 faster than keep_cache: false"
    mine.met = mine.extra["x_vs_keep_cache_false"] >= 5
    return list(rows.values())
