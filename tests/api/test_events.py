"""`GET /api/events` (SSE) against a live routerd serving the real SmolLM2, and the EventBus
under it: event order for load → request → unload, replay and filters, a client that leaves
leaves no subscriber behind, and 100 open streams do not break requests."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any, AsyncIterator, Iterator

import aiohttp
import pytest

from routerd.events import EventBus
from tests.conftest import Daemon
from tests.fakes.registry import FakeRegistry

BOUND = 30.0  # seconds any wait below may take at most


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, model_path: Path) -> Iterator[Daemon]:
    d = Daemon({"default_model": "smollm2", "keep_alive": "10m",
                "models": {"smollm2": {"model": str(model_path), "backend": "llama-server",
                                       "parallel": 2, "ctx_size": 1024}}},
               tmp_path_factory.mktemp("events"))
    yield d
    assert d.stop() == 0, d.log()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as s:
        yield s


class Stream:
    """One open /api/events response, read event by event."""

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self.resp = resp
        self._buf = b""

    async def next(self, timeout: float = BOUND) -> dict[str, Any]:
        async def read() -> dict[str, Any]:
            while True:
                end = self._buf.find(b"\n\n")
                if end >= 0:
                    frame, self._buf = self._buf[:end], self._buf[end + 2:]
                    data = [ln[5:].strip() for ln in frame.split(b"\n") if ln.startswith(b"data:")]
                    if data:
                        return json.loads(b"\n".join(data))
                    continue
                chunk = await self.resp.content.readany()
                if not chunk:
                    raise EOFError("stream ended")
                self._buf += chunk
        return await asyncio.wait_for(read(), timeout)

    async def until(self, pred: Any, timeout: float = BOUND) -> list[dict[str, Any]]:
        """Events up to and including the first that satisfies `pred`."""
        seen: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        while True:
            ev = await self.next(max(0.1, deadline - time.monotonic()))
            seen.append(ev)
            if pred(ev):
                return seen


async def open_stream(http: aiohttp.ClientSession, daemon: Daemon, query: str = "",
                      headers: dict[str, str] | None = None) -> Stream:
    resp = await http.get(f"{daemon.base_url}/api/events{query}", headers=headers or {})
    assert resp.status == 200 and resp.content_type == "text/event-stream"
    s = Stream(resp)
    hello = await s.next()
    assert hello["type"] == "hello"
    return s


async def subscribers(http: aiohttp.ClientSession, daemon: Daemon) -> int:
    async with http.get(f"{daemon.base_url}/api/ui/overview") as r:
        return int((await r.json())["events"]["subscribers"])


async def wait_subscribers(http: aiohttp.ClientSession, daemon: Daemon, n: int) -> None:
    deadline = time.monotonic() + BOUND
    while (now := await subscribers(http, daemon)) != n:
        assert time.monotonic() < deadline, f"{now} subscribers, expected {n}"
        await asyncio.sleep(0.05)


async def post(http: aiohttp.ClientSession, daemon: Daemon, path: str,
               body: dict[str, Any]) -> Any:
    async with http.post(daemon.base_url + path, json=body) as r:
        assert r.status == 200, await r.text()
        return await r.json()


def is_(kind: str, **fields: Any) -> Any:
    return lambda ev: ev["type"] == kind and all(ev.get(k) == v for k, v in fields.items())


@pytest.mark.engine
async def test_load_request_unload_in_order(live: Daemon, http: aiohttp.ClientSession) -> None:
    s = await open_stream(http, live)
    await post(http, live, "/api/generate", {"model": "smollm2", "prompt": ""})
    await post(http, live, "/api/chat", {
        "model": "smollm2", "stream": False, "options": {"num_predict": 8, "temperature": 0},
        "messages": [{"role": "user", "content": "Say hi"}]})
    await post(http, live, "/api/generate", {"model": "smollm2", "keep_alive": 0})
    events = await s.until(is_("model.state", model="smollm2", state="not_loaded"))
    s.resp.close()
    kinds = [(e["type"], e.get("state") or e.get("route")) for e in events]
    order = [("model.state", "loading"), ("model.state", "ready"),
             ("request.done", "/api/generate"), ("request.done", "/api/chat"),
             ("model.state", "stopping"), ("model.state", "not_loaded")]
    at = [kinds.index(k) for k in order]
    assert at == sorted(at), kinds
    ids = [e["id"] for e in events if "id" in e]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    ready = events[kinds.index(("model.state", "ready"))]
    assert ready["load_seconds"] > 0 and ready["booked"]["ram"] > 0
    chat = events[kinds.index(("request.done", "/api/chat"))]
    assert chat["model"] == "smollm2" and chat["status"] == 200 and chat["dialect"] == "ollama"
    assert chat["output_tokens"] > 0 and chat["prompt_tokens"] > 0
    assert any(e["type"] == "model.memory" and e["model"] == "smollm2" for e in events)
    assert events[-1]["reason"] == "request"


@pytest.mark.engine
async def test_replay_after_last_event_id_and_type_filter(live: Daemon,
                                                          http: aiohttp.ClientSession) -> None:
    s = await open_stream(http, live, "?types=model.state")
    await post(http, live, "/api/generate", {"model": "smollm2", "prompt": ""})
    events = await s.until(is_("model.state", state="ready"))
    assert {e["type"] for e in events} == {"model.state"}
    s.resp.close()
    first = events[0]["id"]
    again = await open_stream(http, live, "?types=model.state",
                              headers={"Last-Event-ID": str(first - 1)})
    replayed = await again.until(is_("model.state", state="ready"))
    assert [e["id"] for e in replayed] == [e["id"] for e in events]
    again.resp.close()
    await post(http, live, "/api/generate", {"model": "smollm2", "keep_alive": 0})


@pytest.mark.engine
async def test_a_client_that_leaves_leaves_no_subscriber(live: Daemon,
                                                         http: aiohttp.ClientSession) -> None:
    await wait_subscribers(http, live, 0)
    streams = [await open_stream(http, live) for _ in range(3)]
    assert await subscribers(http, live) == 3
    for s in streams:
        s.resp.close()  # the connection goes, without a word
    await wait_subscribers(http, live, 0)


@pytest.mark.engine
async def test_hundred_open_streams_do_not_break_requests(
        live: Daemon, http: aiohttp.ClientSession) -> None:
    await wait_subscribers(http, live, 0)
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn) as many:
        streams = await asyncio.gather(*(open_stream(many, live) for _ in range(100)))
        assert await subscribers(http, live) == 100
        body = {"model": "smollm2", "stream": False,
                "options": {"num_predict": 4, "temperature": 0},
                "messages": [{"role": "user", "content": "Hi"}]}
        answers = await asyncio.gather(*(post(http, live, "/api/chat", body) for _ in range(4)))
        assert all(a["done"] and a["message"]["content"] for a in answers)
        # Every stream saw every completion.
        for s in streams:
            done = 0
            while done < 4:
                ev = await s.next()
                done += ev["type"] == "request.done" and ev.get("route") == "/api/chat"
        for s in streams:
            s.resp.close()
    await wait_subscribers(http, live, 0)
    await post(http, live, "/api/generate", {"model": "smollm2", "keep_alive": 0})


@pytest.mark.engine
async def test_pull_and_delete_are_published(live: Daemon, http: aiohttp.ClientSession,
                                             model_path: Path) -> None:
    s = await open_stream(http, live, "?types=pull.,model.deleted")
    async with FakeRegistry() as reg:
        reg.add_smollm2(model_path)
        name = f"{reg.host}/library/smollm2:latest"
        async with http.post(live.base_url + "/api/pull",
                             json={"model": name, "insecure": True}) as r:
            lines = [json.loads(line) for line in (await r.read()).splitlines()]
        assert lines[-1] == {"status": "success"}
    events = await s.until(is_("pull.done", model=name))
    progress = [e for e in events if e["type"] == "pull.progress"]
    assert progress[0]["model"] == name and progress[-1]["status"] == "success"
    gguf = max((e for e in progress if e.get("total")), key=lambda e: e["total"])
    done = [e for e in progress if e.get("digest") == gguf["digest"]]
    assert done[-1]["completed"] == done[-1]["total"] == model_path.stat().st_size
    async with http.delete(live.base_url + "/api/delete", json={"model": name}) as r:
        assert r.status == 200
    assert (await s.until(is_("model.deleted")))[-1]["model"] == name
    s.resp.close()


async def test_streams_end_when_routerd_stops(tmp_path: Path,
                                             http: aiohttp.ClientSession) -> None:
    """An open event stream does not hold the shutdown's drain (120 s) open: routerd exits
    0 on SIGTERM before Daemon.stop's 30 s run out (else it is SIGKILLed: -9)."""
    d = Daemon({"models": {}, "timeouts": {"drain": "120s"}}, tmp_path)
    try:
        s = await open_stream(http, d)
        code = await asyncio.to_thread(d.stop)
        assert code == 0, d.log()
        with pytest.raises(EOFError):
            await s.next()
    finally:
        d.stop()


# ---------------------------------------------------------------- the bus alone


def test_publish_never_raises_nor_blocks() -> None:
    bus = EventBus(history=3, queue=2)

    def broken(ev: dict[str, Any]) -> None:
        raise RuntimeError("a consumer's bug")

    seen: list[str] = []
    bus.listen(broken)
    bus.listen(lambda ev: seen.append(ev["type"]))
    with bus.subscribe() as sub:
        for i in range(5):
            bus.publish("x", n=i, id="ignored", blob=object())
        assert sub.dropped == 3 and bus.subscribers == 1
    assert bus.subscribers == 0
    assert seen == ["x"] * 5  # a broken listener does not stop the others
    assert [e["n"] for e in bus.recent] == [2, 3, 4]
    assert [e["id"] for e in bus.recent] == [3, 4, 5]  # the bus's ids win over a field's


async def test_subscription_gets_in_order_and_closes() -> None:
    bus = EventBus()
    with bus.subscribe() as sub:
        bus.publish("a")
        bus.publish("b")
        got = [await sub.get(1), await sub.get(1)]
        assert [e and e["type"] for e in got] == ["a", "b"]
        assert await sub.get(0.01) is None
        waiter = asyncio.ensure_future(sub.get(BOUND))
        await asyncio.sleep(0)
        bus.close()
        assert await asyncio.wait_for(waiter, BOUND) is None and sub.closed
