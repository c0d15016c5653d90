"""routerd.metrics: values, label bookkeeping, the /metrics handler."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from routerd import keys
from routerd.api.security import Handler
from routerd.metrics import MAX_MODELS, OTHER, Metrics, handle_metrics, route_label

pytestmark = pytest.mark.timeout(30)


def value(m: Metrics, name: str, **labels: str) -> float | None:
    return m.registry.get_sample_value(name, labels)


def test_recording() -> None:
    m = Metrics()
    m.observe_request("/api/chat", "smollm2", 200, 0.2)
    m.observe_request("/api/chat", "smollm2", 200, 3.0)
    m.observe_request("/api/chat", "smollm2", 404, 0.001)
    m.observe_request("/api/tags", None, 200, 0.001)
    assert value(m, "routerd_requests_total", route="/api/chat", model="smollm2",
                 status="200") == 2
    assert value(m, "routerd_requests_total", route="/api/tags", model="", status="200") == 1
    assert value(m, "routerd_request_duration_seconds_count", route="/api/chat",
                 model="smollm2") == 3
    assert value(m, "routerd_request_duration_seconds_bucket", route="/api/chat",
                 model="smollm2", le="0.25") == 2
    m.add_tokens("smollm2", 12, 30)
    m.add_tokens("smollm2", 3, 0)
    assert value(m, "routerd_tokens_total", model="smollm2", direction="prompt") == 15
    assert value(m, "routerd_tokens_total", model="smollm2", direction="completion") == 30
    m.set_queue_depth(7)
    assert value(m, "routerd_queue_depth") == 7
    m.inc_load("smollm2")
    m.inc_load("smollm2")
    m.inc_eviction("smollm2")
    m.inc_restart("smollm2")
    assert value(m, "routerd_model_loads_total", model="smollm2") == 2
    assert value(m, "routerd_model_evictions_total", model="smollm2") == 1
    assert value(m, "routerd_worker_restarts_total", model="smollm2") == 1
    m.set_memory("smollm2", "ram", 123_456_789)
    m.set_memory("smollm2", "gpu0", 1 << 30)
    m.set_budget("ram", 8 << 30)
    assert value(m, "routerd_model_memory_bytes", model="smollm2", resource="gpu0") == 1 << 30
    assert value(m, "routerd_memory_budget_bytes", resource="ram") == 8 << 30
    assert value(m, "routerd_build_info", version=__import__("routerd").__version__) == 1


def test_state_is_enum_like() -> None:
    m = Metrics()
    m.set_state("a", "starting")
    m.set_state("a", "ready")
    m.set_state("a", "ready")
    assert value(m, "routerd_worker_state", model="a", state="ready") == 1
    assert value(m, "routerd_worker_state", model="a", state="starting") == 0
    m.set_state("a", "starting")
    assert value(m, "routerd_worker_state", model="a", state="ready") == 0
    assert value(m, "routerd_worker_state", model="a", state="starting") == 1


def test_forget_drops_only_that_model() -> None:
    m = Metrics()
    for model in ("a", "b"):
        m.observe_request("/v1/chat/completions", model, 200, 0.1)
        m.add_tokens(model, 1, 1)
        m.inc_load(model)
        m.set_memory(model, "ram", 10)
        m.set_state(model, "ready")
    m.forget("a")
    text = m.render()[0].decode()
    assert 'model="a"' not in text
    assert 'model="b"' in text
    m.set_state("a", "starting")  # a model can come back
    assert value(m, "routerd_worker_state", model="a", state="starting") == 1
    assert value(m, "routerd_worker_state", model="a", state="ready") is None


def test_model_label_cardinality_is_bounded() -> None:
    m = Metrics()
    for i in range(MAX_MODELS + 50):
        m.observe_request("/api/chat", f"m{i}", 404, 0.001)
    assert value(m, "routerd_requests_total", route="/api/chat", model=OTHER,
                 status="404") == 50
    m.forget("m0")
    m.observe_request("/api/chat", "late", 200, 0.001)
    assert value(m, "routerd_requests_total", route="/api/chat", model="late",
                 status="200") == 1


def test_registries_are_separate() -> None:
    a, b = Metrics(), Metrics()
    a.inc_load("x")
    assert value(a, "routerd_model_loads_total", model="x") == 1
    assert value(b, "routerd_model_loads_total", model="x") is None


async def test_handle_metrics(aiohttp_client: Any) -> None:
    app = web.Application()
    metrics = Metrics()
    app[keys.METRICS] = metrics

    async def chat(request: web.Request) -> web.Response:
        metrics.observe_request(route_label(request), "smollm2", 200, 0.05)
        return web.Response(text="ok")

    app.router.add_get("/metrics", handle_metrics)
    app.router.add_post("/upstream/{model}/{path:.*}", chat)
    client = await aiohttp_client(app)
    assert (await client.post("/upstream/smollm2/props")).status == 200
    resp = await client.get("/metrics")
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    families = {f.name: f for f in text_string_to_metric_families(await resp.text())}
    [sample] = [s for s in families["routerd_requests"].samples if s.name.endswith("_total")]
    assert sample.labels == {"route": "/upstream/{model}/{path}", "model": "smollm2",
                             "status": "200"}
    assert sample.value == 1
    for name in ("routerd_queue_depth", "routerd_request_duration_seconds", "routerd_build_info"):
        assert name in families
    resp = await client.get("/metrics", headers={"Accept": "application/openmetrics-text"})
    assert resp.headers["Content-Type"].startswith("application/openmetrics-text")
    assert (await resp.text()).endswith("# EOF\n")


async def test_route_label_unmatched(aiohttp_client: Any) -> None:
    seen: list[str] = []

    @web.middleware
    async def record(request: web.Request, handler: Handler) -> web.StreamResponse:
        seen.append(route_label(request))
        return await handler(request)

    app = web.Application(middlewares=[record])
    client = await aiohttp_client(app)
    assert (await client.get("/random/../scan")).status == 404
    assert seen == ["other"]
