"""routerd's app in process with a fake routerd peer (no engine): what the listings, the
dashboard overview and a forwarded request look like, and what the peer receives."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from routerd.app import make_app
from routerd.config import parse_config
from tests.peers.test_peer_health import FakePeer


class ChatPeer(FakePeer):
    def __init__(self) -> None:
        super().__init__()
        self.bodies: list[dict[str, Any]] = []
        self.auth: list[str] = []

    async def ps(self, request: web.Request) -> web.Response:
        return web.json_response({"models": [{"name": "smol", "routerd": {
            "state": "ready", "parallel": 2, "booked": {"ram": 4}}}],
            "routerd": {"budget": {"ram": 10}}})

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        self.auth.append(request.headers.get("Authorization", ""))
        if not body.get("stream"):
            return web.json_response({"choices": [{"index": 0, "finish_reason": "stop",
                                                   "message": {"role": "assistant",
                                                               "content": "hi"}}]})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for piece in ("h", "i"):
            chunk = {"choices": [{"index": 0, "delta": {"content": piece}}]}
            await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        return resp


@pytest.fixture
async def routerd(tmp_path: Path, aiohttp_server: Any) -> AsyncIterator[tuple[str, ChatPeer]]:
    peer = ChatPeer()
    papp = web.Application()
    for path, handler in (("/api/tags", peer.tags), ("/api/ps", peer.ps),
                          ("/api/version", peer.version)):
        papp.router.add_get(path, handler)
    papp.router.add_post("/v1/chat/completions", peer.chat)
    server = await aiohttp_server(papp)
    config = parse_config({
        "host": "127.0.0.1", "port": 0, "state_dir": str(tmp_path / "s"),
        "models_dir": str(tmp_path / "m"), "memory": {"ram_budget": "50%", "gpus": []},
        "discovery": {k: False for k in ("ollama", "gpt4all", "lmstudio", "huggingface",
                                         "llama_cpp")},
        "peers": [{"name": "b", "url": str(server.make_url("")).rstrip("/"),
                   "api_key": "peer-key", "interval": "1s"}]})
    app = make_app(config)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        base = f"http://127.0.0.1:{runner.addresses[0][1]}"
        async with aiohttp.ClientSession() as http:
            for _ in range(200):
                async with http.get(base + "/api/tags") as r:
                    if (await r.json())["models"]:
                        break
                await asyncio.sleep(0.02)
        yield base, peer
    finally:
        await runner.cleanup()


async def test_listings_and_the_dashboard_overview_show_the_peer(
        routerd: tuple[str, ChatPeer]) -> None:
    base, _ = routerd
    async with aiohttp.ClientSession() as http:
        async with http.get(base + "/api/tags") as r:
            (tag,) = (await r.json())["models"]
        assert tag["name"] == "smol" and tag["routerd"]["source"] == "peer:b"
        async with http.get(base + "/api/ps") as r:
            ps = await r.json()
        assert [(m["name"], m["routerd"]["peer"]) for m in ps["models"]] == [("smol", "b")]
        (status,) = ps["routerd"]["peers"]
        assert status["up"] and status["kind"] == "routerd" and status["budget"] == {"ram": 10}
        async with http.get(base + "/api/ui/overview") as r:
            (peer,) = (await r.json())["peers"]
        assert peer["name"] == "b" and peer["loaded"] == ["smol"]


async def test_ollama_and_anthropic_requests_reach_the_peer_as_chat_with_its_key_and_name(
        routerd: tuple[str, ChatPeer]) -> None:
    base, peer = routerd
    async with aiohttp.ClientSession() as http:
        async with http.post(base + "/api/chat", json={
                "model": "b/smol", "stream": True,
                "messages": [{"role": "user", "content": "x"}]}) as r:
            lines = [json.loads(x) for x in (await r.read()).splitlines() if x.strip()]
        assert "".join(x["message"]["content"] for x in lines) == "hi" and lines[-1]["done"]
        async with http.post(base + "/v1/messages", json={
                "model": "smol", "max_tokens": 4,
                "messages": [{"role": "user", "content": "x"}]},
                headers={"Authorization": "Bearer client-key"}) as r:
            msg = await r.json()
        assert msg["content"][0]["text"] == "hi" and msg["model"] == "smol"
    assert [b["model"] for b in peer.bodies] == ["smol", "smol"]
    assert peer.auth == ["Bearer peer-key", "Bearer peer-key"]
