"""Cold loads that talk to the client, against a live daemon and slow-starting fake workers
(`--slow-start`): SSE streams get `: loading NN%` comments (Anthropic also `ping` events)
while the model loads and the SDKs parse them unchanged; Ollama streams get nothing extra,
the load's progress is on /api/events and /api/ps; non-streamed answers are unaffected; a
client leaving mid-load leaves the load running (the next request finds it ready)."""

from __future__ import annotations

import http.client
import json
import threading
import time
import urllib.request
from typing import Any, Iterator

import pytest

from tests.conftest import Daemon, fake_model

pytestmark = pytest.mark.timeout(120)
SLOW = 2.5  # seconds each cold load takes: the first keep-alive goes out after 1 s
REPLY = "Hello from the fake worker."
MODELS = ("sse", "sdk", "native", "anthropic", "ollama", "plain", "leave")


@pytest.fixture(scope="module")
def cold(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    models = {n: fake_model("--slow-start", str(SLOW)) for n in MODELS}
    d = Daemon({"models": models, "keep_alive": "10m"}, tmp_path_factory.mktemp("cold"))
    yield d
    assert d.stop() == 0, d.log()


def stream_lines(d: Daemon, path: str, body: dict[str, Any]) -> list[str]:
    req = urllib.request.Request(d.base_url + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        assert r.status == 200
        return [line.decode().rstrip("\r\n") for line in r]


def comments(lines: list[str]) -> list[str]:
    return [x for x in lines if x.startswith(":")]


def chat(model: str, stream: bool = True) -> dict[str, Any]:
    return {"model": model, "stream": stream, "messages": [{"role": "user", "content": "hi"}]}


def test_openai_stream_sends_loading_comments_then_the_answer(cold: Daemon) -> None:
    lines = stream_lines(cold, "/v1/chat/completions", chat("sse"))
    notes = comments(lines)
    assert notes and all(n.startswith(": loading ") and n.endswith("%") for n in notes), lines
    data = [x for x in lines if x.startswith("data: ")]
    assert data[-1] == "data: [DONE]"
    first_data = lines.index(data[0])
    assert all(lines.index(n) < first_data for n in notes)  # only while waiting


def test_sdks_parse_cold_streams_unchanged(cold: Daemon) -> None:
    import openai

    client = openai.OpenAI(base_url=cold.base_url + "/v1", api_key="x", max_retries=0)
    text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="sdk", messages=[{"role": "user", "content": "hi"}], stream=True) if c.choices)
    assert text.strip() == REPLY
    assert cold.get("/api/ps")["models"]  # it loaded

    cold.post("/api/generate", {"model": "sdk", "keep_alive": 0})  # cold again
    deadline = time.monotonic() + 30
    while any(m["name"] == "sdk" for m in cold.get("/api/ps")["models"]):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    pieces = [c.choices[0].text for c in client.completions.create(
        model="sdk", prompt="hi", stream=True) if c.choices]
    assert "".join(pieces).strip() == REPLY


def test_native_stream_sends_comments(cold: Daemon) -> None:
    lines = stream_lines(cold, "/completion", {"model": "native", "prompt": "hi",
                                                "stream": True})
    assert comments(lines) and any('"stop": true' in x or '"stop":true' in x for x in lines)


def test_anthropic_stream_pings_and_the_sdk_parses_it(cold: Daemon) -> None:
    lines = stream_lines(cold, "/v1/messages", {"model": "anthropic", "max_tokens": 32,
                                                 "stream": True, **chat("anthropic")})
    assert "event: ping" in lines and comments(lines)
    assert lines.index("event: ping") > lines.index("event: message_start")

    import anthropic

    cold.post("/api/generate", {"model": "anthropic", "keep_alive": 0})
    deadline = time.monotonic() + 30
    while any(m["name"] == "anthropic" for m in cold.get("/api/ps")["models"]):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    client = anthropic.Anthropic(base_url=cold.base_url, api_key="x", max_retries=0)
    with client.messages.stream(model="anthropic", max_tokens=32,
                                messages=[{"role": "user", "content": "hi"}]) as s:
        text = "".join(s.text_stream)
    assert text.strip() == REPLY


def test_ollama_stream_gets_nothing_extra_and_progress_is_on_events(cold: Daemon) -> None:
    import ollama

    events: list[dict[str, Any]] = []
    ps_seen: list[Any] = []
    ready = threading.Event()

    def watch() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", cold.port, timeout=30)
        conn.request("GET", "/api/events")
        r = conn.getresponse()
        ready.set()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            line = r.readline().decode()
            if line.startswith("data: "):
                ev = json.loads(line[6:])
                events.append(ev)
                if ev.get("type") == "model.loading" and ev.get("model") == "ollama":
                    ps_seen.append([m["routerd"].get("load_progress")
                                    for m in cold.get("/api/ps")["models"]
                                    if m["name"] == "ollama"])
                if ev.get("type") == "model.state" and ev.get("state") == "ready":
                    break
        conn.close()

    t = threading.Thread(target=watch)
    t.start()
    assert ready.wait(10)
    client = ollama.Client(host=cold.base_url)
    parts = list(client.chat(model="ollama", messages=[{"role": "user", "content": "hi"}],
                             stream=True))
    t.join(30)
    assert "".join(p.message.content or "" for p in parts).strip() == REPLY
    loading = [e for e in events if e.get("type") == "model.loading"
               and e.get("model") == "ollama"]
    assert loading and all(0 <= e["progress"] < 1 for e in loading)
    assert any(seen and seen[0] is not None for seen in ps_seen), ps_seen


def test_non_streamed_answers_are_unaffected(cold: Daemon) -> None:
    req = urllib.request.Request(cold.base_url + "/v1/chat/completions",
                                 data=json.dumps(chat("plain", stream=False)).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        raw = r.read()
        assert r.headers["Content-Type"].startswith("application/json")
    assert json.loads(raw)["choices"][0]["message"]["content"].strip() == REPLY


def test_a_client_leaving_mid_load_leaves_the_load_running(cold: Daemon) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", cold.port, timeout=30)
    conn.request("POST", "/v1/chat/completions", body=json.dumps(chat("leave")),
                 headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    assert r.status == 200
    assert r.readline().startswith(b": loading")  # the load is under way
    conn.close()  # the client leaves before the model is ready
    deadline = time.monotonic() + 30
    state = None
    while time.monotonic() < deadline:
        found = [m for m in cold.get("/api/ps")["models"] if m["name"] == "leave"]
        state = found[0]["routerd"]["state"] if found else None
        if state == "ready":
            break
        time.sleep(0.05)
    assert state == "ready", cold.log()
    pid = cold.worker_pids()
    answer = cold.post("/v1/chat/completions", chat("leave", stream=False))
    assert answer["choices"][0]["message"]["content"].strip() == REPLY
    assert cold.worker_pids() == pid  # the same engine: nothing reloaded
