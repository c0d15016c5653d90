"""Prometheus metrics on routerd's own registry (never the global one, so several apps in one
process, as in the tests, do not collide).

The recording methods are cheap (a dict lookup and an add) and safe to call from the request
path. Label cardinality is bounded: pass route templates (see `route_label`), not raw paths,
and only model names routerd knows; past `MAX_MODELS` distinct names the rest are counted as
`_other`. Counters stay monotonic for `rate()`: `unloaded(model)` drops only the gauges that
describe a loaded engine (memory, over-booking, state); `forget(model)` drops every series of
a model that left the catalog for good.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web
from prometheus_client import (
    CollectorRegistry, Counter, Gauge, Histogram, PlatformCollector, ProcessCollector,
)
from prometheus_client.exposition import choose_encoder

from . import __version__, keys

MAX_MODELS = 256
OTHER = "_other"
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


def route_label(request: web.Request) -> str:
    """The matched route's template (`/upstream/{model}/{path}`), or `other` when none
    matched, so a scan of random paths cannot grow the label set."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "other"


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        Gauge("routerd_build_info", "routerd version", ["version"],
              registry=r).labels(__version__).set(1)
        self.requests = Counter("routerd_requests", "HTTP requests answered",
                                ["route", "model", "status"], registry=r)
        self.latency = Histogram("routerd_request_duration_seconds",
                                 "Time to answer a request, streams until their last byte",
                                 ["route", "model"], buckets=LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("routerd_tokens", "Tokens processed",
                              ["model", "direction"], registry=r)
        self.queue_depth = Gauge("routerd_queue_depth", "Requests waiting for a worker",
                                 registry=r)
        self.loads = Counter("routerd_model_loads", "Model loads started", ["model"], registry=r)
        self.evictions = Counter("routerd_model_evictions", "Models unloaded to make room",
                                 ["model"], registry=r)
        self.restarts = Counter("routerd_worker_restarts", "Worker restarts after a fault",
                                ["model"], registry=r)
        self.memory = Gauge("routerd_model_memory_bytes", "Memory held by a loaded model",
                            ["model", "resource"], registry=r)
        self.budget = Gauge("routerd_memory_budget_bytes", "Memory budget per resource",
                            ["resource"], registry=r)
        self.over_booking = Gauge("routerd_vram_over_booking_bytes",
                                  "How far a worker's measured VRAM grew past its booking",
                                  ["model", "resource"], registry=r)
        self.state = Gauge("routerd_worker_state", "1 for the worker's current state, else 0",
                           ["model", "state"], registry=r)
        self.keys = Counter("routerd_key_requests", "Requests per API key (its name from the "
                            "keys file, never the key) by outcome", ["key", "outcome"],
                            registry=r)
        # Peers (routerd/peers/): one series per configured peer, dropped when it is removed.
        self.peer_up = Gauge("routerd_peer_up", "1 while the peer answers its polls",
                             ["peer"], registry=r)
        self.peer_latency = Gauge("routerd_peer_poll_latency_seconds",
                                  "How long the peer's last good poll took", ["peer"],
                                  registry=r)
        self.peer_requests = Counter("routerd_peer_requests", "Requests forwarded to the peer",
                                     ["peer"], registry=r)
        self.peer_failures = Counter("routerd_peer_failures",
                                     "Forwarded requests that failed on the peer", ["peer"],
                                     registry=r)
        self._models: set[str] = set()
        self._series: dict[str, dict[tuple[Any, tuple[str, ...]], Any]] = {}
        self._states: dict[str, str] = {}

    # ------------------------------------------------------------ label bookkeeping

    def _model(self, model: str | None) -> str:
        if not model:
            return ""
        if model not in self._models:
            if len(self._models) >= MAX_MODELS:
                return OTHER
            self._models.add(model)
        return model

    def _child(self, metric: Any, model: str, *values: str) -> Any:
        """metric.labels(*values), remembered under `model` (for `forget`) and cached: the
        request path asks for the same few children on every request."""
        series = self._series.get(model)
        if series is None:
            series = self._series[model] = {}
        child = series.get((metric, values))
        if child is None:
            child = series[(metric, values)] = metric.labels(*values)
        return child

    # ------------------------------------------------------------ recording

    def observe_request(self, route: str, model: str | None, status: int,
                        seconds: float) -> None:
        m = self._model(model)
        self._child(self.requests, m, route, m, str(status)).inc()
        self._child(self.latency, m, route, m).observe(seconds)

    def add_tokens(self, model: str, prompt: int, completion: int) -> None:
        m = self._model(model)
        if prompt:
            self._child(self.tokens, m, m, "prompt").inc(prompt)
        if completion:
            self._child(self.tokens, m, m, "completion").inc(completion)

    def set_queue_depth(self, n: int) -> None:
        self.queue_depth.set(n)

    def inc_load(self, model: str) -> None:
        m = self._model(model)
        self._child(self.loads, m, m).inc()

    def inc_eviction(self, model: str) -> None:
        m = self._model(model)
        self._child(self.evictions, m, m).inc()

    def inc_restart(self, model: str) -> None:
        m = self._model(model)
        self._child(self.restarts, m, m).inc()

    def set_memory(self, model: str, resource: str, nbytes: int) -> None:
        m = self._model(model)
        self._child(self.memory, m, m, resource).set(nbytes)

    def set_budget(self, resource: str, nbytes: int) -> None:
        self.budget.labels(resource).set(nbytes)

    def set_vram_over_booking(self, model: str, resource: str, nbytes: int) -> None:
        m = self._model(model)
        self._child(self.over_booking, m, m, resource).set(nbytes)

    def set_state(self, model: str, state: str) -> None:
        """Enum-style: the current state reads 1, states seen before read 0."""
        m = self._model(model)
        previous = self._states.get(m)
        if previous == state:
            return
        if previous is not None:
            self.state.labels(m, previous).set(0)
        self._states[m] = state
        self._child(self.state, m, m, state).set(1)

    def unloaded(self, model: str) -> None:
        """The model's engine is gone (unloaded, evicted, crashed): drop the gauges that
        describe a loaded engine. Its counters (loads, evictions, restarts, requests, tokens)
        keep counting across loads."""
        series = self._series.get(model, {})
        for metric, values in [k for k in series if k[0] in self._engine_gauges()]:
            del series[(metric, values)]
            metric.remove(*values)
        self._states.pop(model, None)

    def _engine_gauges(self) -> tuple[Any, ...]:
        return (self.memory, self.over_booking, self.state)

    def count_key(self, key: str, outcome: str) -> None:
        """One request of an API key: admitted, rate_limited or forbidden."""
        self.keys.labels(key, outcome).inc()

    def forget(self, model: str) -> None:
        """Drop every series of a model that left the catalog (removed, deleted)."""
        for metric, values in self._series.pop(model, {}):
            metric.remove(*values)
        self._states.pop(model, None)
        self._models.discard(model)

    def set_peer(self, peer: str, *, up: bool, latency: float | None) -> None:
        self.peer_up.labels(peer).set(1 if up else 0)
        if latency is not None:
            self.peer_latency.labels(peer).set(latency)

    def inc_peer_request(self, peer: str) -> None:
        self.peer_requests.labels(peer).inc()

    def inc_peer_failure(self, peer: str) -> None:
        self.peer_failures.labels(peer).inc()

    def forget_peer(self, peer: str) -> None:
        for metric in (self.peer_up, self.peer_latency, self.peer_requests, self.peer_failures):
            try:
                metric.remove(peer)
            except KeyError:
                pass

    def render(self, accept: str = "") -> tuple[bytes, str]:
        """The exposition (text format, or OpenMetrics when asked) and its content type."""
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type


async def handle_metrics(request: web.Request) -> web.Response:
    """GET /metrics: the app's Metrics in the format the scraper asked for."""
    metrics: Metrics = request.app[keys.METRICS]
    body, content_type = metrics.render(request.headers.get("Accept", ""))
    return web.Response(body=body, headers={"Content-Type": content_type})


class NullMetrics(Metrics):
    """Metrics that record nothing: for a scheduler run without /metrics (tests, tools)."""

    def __init__(self) -> None:  # no registry, no collectors
        pass

    def observe_request(self, route: str, model: str | None, status: int,
                        seconds: float) -> None:
        pass

    def add_tokens(self, model: str, prompt: int, completion: int) -> None:
        pass

    def set_queue_depth(self, n: int) -> None:
        pass

    def inc_load(self, model: str) -> None:
        pass

    def inc_eviction(self, model: str) -> None:
        pass

    def inc_restart(self, model: str) -> None:
        pass

    def set_memory(self, model: str, resource: str, nbytes: int) -> None:
        pass

    def set_budget(self, resource: str, nbytes: int) -> None:
        pass

    def set_vram_over_booking(self, model: str, resource: str, nbytes: int) -> None:
        pass

    def set_state(self, model: str, state: str) -> None:
        pass

    def unloaded(self, model: str) -> None:
        pass

    def count_key(self, key: str, outcome: str) -> None:
        pass

    def forget(self, model: str) -> None:
        pass

    def set_peer(self, peer: str, *, up: bool, latency: float | None) -> None:
        pass

    def inc_peer_request(self, peer: str) -> None:
        pass

    def inc_peer_failure(self, peer: str) -> None:
        pass

    def forget_peer(self, peer: str) -> None:
        pass
