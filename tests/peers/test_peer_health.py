"""A peer's health from its polls (routerd/peers/peer.py), against a small aiohttp server
that plays a routerd peer: slow → down within the poll timeout; back → up within one
interval; a request failing there marks it down at once; the peer's key is what it gets."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from routerd.config import PeerConfig
from routerd.metrics import Metrics
from routerd.peers.peer import Peer
from routerd.peers.peers import Peers
from routerd.peers.router import PeerTarget


class FakePeer:
    def __init__(self) -> None:
        self.delay = 0.0
        self.keys: list[str] = []

    async def tags(self, request: web.Request) -> web.Response:
        self.keys.append(request.headers.get("Authorization", ""))
        await asyncio.sleep(self.delay)
        return web.json_response({"models": [{"name": "smol", "size": 5}]})

    async def ps(self, request: web.Request) -> web.Response:
        return web.json_response({"models": [], "routerd": {"budget": {"ram": 10}}})

    async def version(self, request: web.Request) -> web.Response:
        return web.json_response({"version": "0.12.0", "routerd": "0.1.0"})


@pytest.fixture
async def fake(aiohttp_server: Any) -> tuple[FakePeer, Any]:
    f = FakePeer()
    app = web.Application()
    app.router.add_get("/api/tags", f.tags)
    app.router.add_get("/api/ps", f.ps)
    app.router.add_get("/api/version", f.version)
    return f, await aiohttp_server(app)


async def _until(cond: Any, bound: float) -> float:
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < bound, "condition not met in time"
        await asyncio.sleep(0.01)
    return time.monotonic() - t0


async def test_a_slow_peer_is_down_within_its_timeout_and_back_within_one_interval(
        fake: tuple[FakePeer, Any]) -> None:
    f, server = fake
    metrics = Metrics()
    config = PeerConfig(name="b", url=str(server.make_url("")).rstrip("/"), api_key="pk",
                        interval=0.5, timeout=0.2, backoff=0.05)
    async with aiohttp.ClientSession() as session:
        peer = Peer(config, session, metrics)
        peer.start()
        try:
            await _until(lambda: peer.up, 5)
            assert peer.kind == "routerd" and peer.free == 10 and set(peer.models) == {"smol"}
            assert f.keys and all(k == "Bearer pk" for k in f.keys)
            f.delay = 1.0  # slower than the timeout
            await _until(lambda: not peer.up, 5)
            assert "TimeoutError" in (peer.error or "")
            assert set(peer.models) == {"smol"}  # still listed while down (requests get 503)
            f.delay = 0.0
            await _until(lambda: peer.up, 5)
            text = metrics.render()[0].decode()
            assert 'routerd_peer_up{peer="b"} 1.0' in text
            assert 'routerd_peer_poll_latency_seconds{peer="b"}' in text
        finally:
            await peer.stop()
        assert 'peer="b"' not in metrics.render()[0].decode()  # a removed peer's series go


async def test_a_request_failing_on_a_peer_whose_port_is_gone_marks_it_down_at_once(
        fake: tuple[FakePeer, Any]) -> None:
    f, server = fake
    config = PeerConfig(name="b", url=str(server.make_url("")).rstrip("/"), interval=60)
    async with aiohttp.ClientSession() as session:
        peers = Peers([config], session)
        peers.start()
        try:
            peer = peers.by_name["b"]
            await _until(lambda: peer.up, 5)
            target = PeerTarget(peer, "smol", "smol")
            url, body = target.forward("/v1/chat/completions", b'{"model":"b/smol","x":1}')
            assert url.endswith("/v1/chat/completions") and body == b'{"model": "smol", "x": 1}'
            assert [o.peer.name for o in peers.offers("b/smol")] == ["b"]
            assert peers.offers("smol:latest") == [] and peers.offers("smol")[0].remote == "smol"
            await server.close()
            assert await target.exit_code(0.1) is None
            assert not peer.up  # without waiting for the next poll (60 s away)
        finally:
            await peers.close()
