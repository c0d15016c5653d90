"""Finding 16: counters survive an unload (rate() needs them monotonic); only an unloaded
model's gauges go."""

from __future__ import annotations

from typing import Any, Callable

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Daemon, fake_model

pytestmark = pytest.mark.timeout(120)


Samples = dict[tuple[str, frozenset[Any]], float]


async def samples(http: aiohttp.ClientSession, d: Daemon) -> Samples:
    async with http.get(d.base_url + "/metrics") as r:
        assert r.status == 200
        text = await r.text()
    return {(s.name, frozenset(s.labels.items())): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def value(s: Samples, name: str, **labels: str) -> float:
    return s.get((name, frozenset(labels.items())), 0.0)


async def generate(http: aiohttp.ClientSession, d: Daemon, model: str, **extra: Any) -> None:
    body = {"model": model, "prompt": "hi", "stream": False, **extra}
    if extra.get("keep_alive") == 0:
        del body["prompt"]  # no prompt, keep_alive 0: Ollama's unload, answered once it is done
    async with http.post(d.base_url + "/api/generate", json=body) as r:
        assert r.status == 200, await r.text()


async def test_counters_survive_unload_and_eviction(daemons: Callable[..., Daemon],
                                                    http: aiohttp.ClientSession) -> None:
    d = daemons({"a": fake_model(), "b": fake_model()}, max_loaded=1)
    seen: list[Samples] = []

    async def step() -> Samples:
        s = await samples(http, d)
        seen.append(s)
        return s

    await generate(http, d, "a")
    await generate(http, d, "a", keep_alive=0)  # unload by request
    after_unload = await step()
    assert value(after_unload, "routerd_model_loads_total", model="a") == 1
    assert value(after_unload, "routerd_model_memory_bytes", model="a", resource="ram") == 0
    assert not any(n == "routerd_model_memory_bytes" and ("model", "a") in labels
                   for n, labels in after_unload), "an unloaded model's memory gauge stays"
    await generate(http, d, "a")  # loaded again
    s = await step()
    assert value(s, "routerd_model_loads_total", model="a") == 2
    assert value(s, "routerd_requests_total", route="/api/generate", model="a",
                 status="200") == 3  # load, unload, load
    await generate(http, d, "b")  # max_loaded 1: evicts a
    await step()
    await generate(http, d, "a")  # evicts b
    s = await step()
    assert value(s, "routerd_model_loads_total", model="a") == 3
    assert value(s, "routerd_model_loads_total", model="b") == 1
    assert value(s, "routerd_model_evictions_total", model="a") == 1
    assert value(s, "routerd_model_evictions_total", model="b") == 1
    for name in ("routerd_model_loads_total", "routerd_model_evictions_total",
                 "routerd_requests_total", "routerd_worker_restarts_total"):
        keys = {k for snap in seen for k in snap if k[0] == name}
        for k in keys:
            series = [snap.get(k, 0.0) for snap in seen]
            assert series == sorted(series), f"{name}{dict(k[1])} fell: {series}"


def test_unloaded_drops_engine_gauges_only() -> None:
    from routerd.metrics import Metrics

    m = Metrics()
    m.inc_load("a")
    m.inc_eviction("a")
    m.set_memory("a", "ram", 10)
    m.set_vram_over_booking("a", "gpu0", 5)
    m.set_state("a", "ready")
    m.unloaded("a")
    get = m.registry.get_sample_value
    assert get("routerd_model_loads_total", {"model": "a"}) == 1
    assert get("routerd_model_evictions_total", {"model": "a"}) == 1
    assert get("routerd_model_memory_bytes", {"model": "a", "resource": "ram"}) is None
    assert get("routerd_vram_over_booking_bytes", {"model": "a", "resource": "gpu0"}) is None
    assert get("routerd_worker_state", {"model": "a", "state": "ready"}) is None
    m.inc_load("a")
    m.set_state("a", "loading")
    assert get("routerd_model_loads_total", {"model": "a"}) == 2
    assert get("routerd_worker_state", {"model": "a", "state": "loading"}) == 1
    m.forget("a")  # deleted: everything goes
    assert get("routerd_model_loads_total", {"model": "a"}) is None
