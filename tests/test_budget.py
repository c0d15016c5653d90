"""The memory-budget scheduler with real llama-server workers: evict by bytes, LRU, never a
serving model, refuse what cannot fit, keep_alive, and the bounded queue."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import aiohttp
import pytest

from routerd.scheduler import memory
from routerd.store.gguf import read_gguf
from tests.conftest import Daemon, fake_model

pytestmark = pytest.mark.timeout(300)
CTX = 512


@pytest.fixture(scope="module")
def budgeted(tmp_path_factory: pytest.TempPathFactory, model_path: Path) -> Iterator[Daemon]:
    est = memory.estimate(read_gguf(model_path), ctx_size=CTX, parallel=1, gpu_layers=0,
                          gpu_count=0, backend="llama-server")
    budget = int(est.ram * 2.5)  # room for two SmolLM2 workers, not three
    spec = {"model": str(model_path), "backend": "llama-server", "ctx_size": CTX}
    d = Daemon({
        "memory": {"ram_budget": budget, "gpus": []},
        "keep_alive": "10m",
        "models": {"a": spec, "b": spec, "c": spec,
                   "huge": {**spec, "ctx_size": 131072, "parallel": 8}},
    }, tmp_path_factory.mktemp("budget"))
    d.budget = budget  # type: ignore[attr-defined]
    yield d
    assert d.stop() == 0, d.log()


def gen(d: Daemon, model: str, n: int = 2, **extra: Any) -> dict[str, Any]:
    return d.post("/api/generate", {"model": model, "prompt": "Hi", "stream": False,
                                    "options": {"num_predict": n, "temperature": 0}, **extra})


def loaded(d: Daemon) -> dict[str, dict[str, Any]]:
    return {m["name"]: m for m in d.get("/api/ps")["models"]}


def test_three_models_room_for_two_lru_goes(budgeted: Daemon) -> None:
    d = budgeted
    for m in ("a", "b"):
        gen(d, m)
    gen(d, "a")  # b is now least recently used
    gen(d, "c")
    assert set(loaded(d)) == {"a", "c"}
    ps = d.get("/api/ps")
    assert sum(m["size"] for m in ps["models"]) <= d.budget  # type: ignore[attr-defined]
    for m in ps["models"]:
        r = m["routerd"]
        assert r["measured"]["ram"] > 0 and r["estimate"]["ram"] > 0
        assert abs(r["measured"]["ram"] - r["estimate"]["ram"]) / r["measured"]["ram"] < 0.25
        assert m["size_vram"] == 0 and m["context_length"] == CTX


def test_streaming_model_never_evicted_while_idle_one_exists(budgeted: Daemon) -> None:
    d = budgeted
    gen(d, "a")
    gen(d, "b")  # loaded: a (LRU) and b
    result: dict[str, Any] = {}

    def stream_a() -> None:
        import urllib.request

        req = urllib.request.Request(d.base_url + "/api/generate", data=json.dumps(
            {"model": "a", "prompt": "Tell a long story about the sea.",
             "options": {"num_predict": 160, "temperature": 0}}).encode())
        try:
            with urllib.request.urlopen(req, timeout=240) as r:
                result["lines"] = [json.loads(x) for x in r.read().splitlines() if x.strip()]
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            result["error"] = repr(e)

    t = threading.Thread(target=stream_a)
    t.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and loaded(d).get("a", {}).get("routerd", {}).get(
            "in_use", 0) == 0:
        time.sleep(0.02)
    gen(d, "c")  # needs room: b is idle, a is serving → b goes
    assert set(loaded(d)) == {"a", "c"}
    t.join(240)
    assert "lines" in result, result.get("error")
    lines = result["lines"]
    assert lines[-1]["done"] is True and not any("error" in x for x in lines)
    assert lines[-1]["eval_count"] > 20


def test_too_big_refused_fast_and_nothing_evicted(budgeted: Daemon) -> None:
    d = budgeted
    gen(d, "a")
    before = set(loaded(d))
    t0 = time.monotonic()
    with pytest.raises(Exception) as e:
        gen(d, "huge")
    elapsed = time.monotonic() - t0
    body = json.loads(e.value.read())  # type: ignore[attr-defined]
    assert elapsed < 2, elapsed
    assert e.value.code == 507  # type: ignore[attr-defined]
    assert "needs" in body["error"] and "budget" in body["error"]
    assert set(loaded(d)) == before


def test_keep_alive_1s_expires_and_0_unloads(budgeted: Daemon) -> None:
    d = budgeted
    gen(d, "b", keep_alive="1s")
    assert "b" in loaded(d)
    deadline = time.monotonic() + 10
    while "b" in loaded(d) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "b" not in loaded(d)
    gen(d, "c")
    r = d.post("/api/generate", {"model": "c", "keep_alive": 0})  # empty prompt + 0 → unload
    assert r["done_reason"] == "unload" and "c" not in loaded(d)
    r = d.post("/api/generate", {"model": "c"})  # empty prompt → load only
    assert r["done_reason"] == "load" and "c" in loaded(d)


async def test_sum_never_exceeds_budget_under_mixed_load(budgeted: Daemon) -> None:
    d = budgeted
    budget = d.budget  # type: ignore[attr-defined]
    seen: list[int] = []
    stop = asyncio.Event()

    async def watch(s: aiohttp.ClientSession) -> None:
        while not stop.is_set():
            async with s.get(d.base_url + "/api/ps") as r:
                seen.append(sum(m["size"] for m in (await r.json())["models"]))
            await asyncio.sleep(0.02)

    async def ask(s: aiohttp.ClientSession, model: str) -> int:
        body = {"model": model, "prompt": "Hi", "stream": False, "options": {"num_predict": 4}}
        async with s.post(d.base_url + "/api/generate", json=body) as r:
            await r.read()
            return r.status

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=180)) as s:
        w = asyncio.create_task(watch(s))
        statuses = await asyncio.gather(*(ask(s, m) for m in "abcabcacb"))
        stop.set()
        await w
    assert statuses == [200] * 9
    assert seen and max(seen) <= budget


def test_queue_bound_only_200_and_503(tmp_path: Path) -> None:
    d = Daemon({"max_queue": 4, "models": {
        "q": fake_model("--tokens", "5", "--token-delay", "0.05", parallel=1)}}, tmp_path)
    try:
        async def run() -> list[tuple[int, str | None]]:
            async with aiohttp.ClientSession() as s:
                async def one() -> tuple[int, str | None]:
                    body = {"model": "q", "messages": [{"role": "user", "content": "x"}],
                            "stream": False}
                    async with s.post(d.base_url + "/v1/chat/completions", json=body) as r:
                        await r.read()
                        return r.status, r.headers.get("Retry-After")
                return await asyncio.gather(*(one() for _ in range(40)))

        results = asyncio.run(asyncio.wait_for(run(), 120))
        codes = [c for c, _ in results]
        assert set(codes) <= {200, 503} and codes.count(200) >= 1 and codes.count(503) >= 1
        assert all(ra for c, ra in results if c == 503)
        assert d.get("/api/ps")["routerd"]["queue"] == 0
        assert d.post("/v1/chat/completions", {"model": "q", "messages": [
            {"role": "user", "content": "x"}]})["choices"]
    finally:
        assert d.stop() == 0, d.log()


def test_num_ctx_is_a_load_option(budgeted: Daemon) -> None:
    d = budgeted
    gen(d, "a")
    assert loaded(d)["a"]["context_length"] == CTX
    gen(d, "a", options={"num_ctx": 1024, "num_predict": 2})
    assert loaded(d)["a"]["context_length"] == 1024
    gen(d, "a")
    assert loaded(d)["a"]["context_length"] == CTX
