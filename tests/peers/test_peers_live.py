"""Peers with real engines on loopback: routerd A (no local model) in front of routerd B
(SmolLM2 on llama-server), a bare llama-server as a `llama-server` peer and as an `openai`
peer, replicas over two engines (two peers; B's local engine and a peer), and B killed
mid-stream and restarted."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.conftest import LLAMA_SERVER, Daemon, free_port

OFF = {"discovery": {"ollama": False, "gpt4all": False, "lmstudio": False,
                     "huggingface": False, "llama_cpp": False}}
HI = [{"role": "user", "content": "Say hello."}]
CLIENT_KEY, PEER_KEY = "client-key-a", "peer-key-b"


def _auth(work: Path, key: str) -> dict[str, Any]:
    work.mkdir(parents=True, exist_ok=True)
    (work / "keys").write_text(key + "\n")
    return {"auth": {"api_keys_file": str(work / "keys"), "exempt_loopback": False,
                     "metrics_public": True}}


def _b_config(work: Path, model_path: Path, ls_url: str) -> dict[str, Any]:
    """B serves smollm2 itself and has the bare llama-server (same name) as a replica."""
    return {**OFF, **_auth(work, PEER_KEY), "keep_alive": "10m", "models": {
        # one thread each: the "hosts" here share 2 cores, and two engines spinning 2
        # threads each slowed 32 short streams from 5 s to 110 s
        "smollm2": {"model": str(model_path), "backend": "llama-server", "ctx_size": 1024,
                    "parallel": 2, "args": ["-t", "1", "-tb", "1"]}},
        "peers": [{"name": "ls", "url": ls_url, "kind": "llama-server", "interval": "1s"}]}


def _get(base: str, path: str, key: str = CLIENT_KEY) -> Any:
    req = urllib.request.Request(base + path, headers={"Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return r.read()


def _post(base: str, path: str, body: dict[str, Any], key: str = CLIENT_KEY,
          timeout: float = 120) -> Any:
    req = urllib.request.Request(base + path, data=json.dumps(body).encode(), headers={
        "Content-Type": "application/json", "Authorization": f"Bearer {key}"})
    return urllib.request.urlopen(req, timeout=timeout)


def _wait_listed(base: str, name: str, timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        tags = json.loads(_get(base, "/api/tags"))["models"]
        for m in tags:
            if m["name"] == name:
                return m
        time.sleep(0.1)
    raise AssertionError(f"{name} never listed on {base}: {tags}")


def _peer_requests(base: str) -> dict[str, float]:
    text = _get(base, "/metrics").decode()
    return {m[1]: float(m[2]) for m in
            re.finditer(r'^routerd_peer_requests_total\{peer="([^"]+)"\} (\S+)$', text, re.M)}


def _wait_listed_b(hosts: Hosts) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for m in json.loads(_get(hosts.b.base_url, "/api/tags", key=PEER_KEY))["models"]:
            if m["name"] == "ls/smollm2":
                return m
        time.sleep(0.1)
    raise AssertionError("ls/smollm2 never listed on B")


class Hosts:
    def __init__(self, work: Path, model_path: Path) -> None:
        self.work, self.model_path = work, model_path
        self.ls_port = free_port()
        ls_url = self.ls_url = f"http://127.0.0.1:{self.ls_port}"
        self.ls_log = open(work / "llama-server.log", "ab")
        self.ls = subprocess.Popen(
            [str(LLAMA_SERVER), "-m", str(model_path), "--host", "127.0.0.1",
             "--port", str(self.ls_port), "--alias", "smollm2", "-c", "1024", "-np", "2",
             "-t", "1", "-tb", "1"],
            stdout=self.ls_log, stderr=subprocess.STDOUT, start_new_session=True)
        self.b = Daemon(_b_config(work / "b", model_path, ls_url), work / "b")
        peer = {"interval": "1s", "timeout": "2s", "backoff": "0.2s"}
        self.a = Daemon({**OFF, **_auth(work / "a", CLIENT_KEY), "peers": [
            {"name": "b", "url": self.b.base_url, "kind": "auto", "api_key": PEER_KEY, **peer}]},
            work / "a")
        self.a2 = Daemon({**OFF, **_auth(work / "a2", CLIENT_KEY), "peers": [
            {"name": "b", "url": self.b.base_url, "kind": "routerd", "api_key": PEER_KEY, **peer},
            {"name": "ls", "url": ls_url, "kind": "llama-server", **peer},
            {"name": "oa", "url": ls_url + "/v1", "kind": "openai", "prefix": "oa-", **peer}]},
            work / "a2")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # llama-server loads the model before /health is 200
            try:
                with urllib.request.urlopen(ls_url + "/health", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.1)

    def stop(self) -> None:
        for d in (self.a, self.a2, self.b):
            d.stop()
        self.ls.send_signal(signal.SIGTERM)
        self.ls.wait(10)
        self.ls_log.close()


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory, model_path: Path) -> Iterator[Hosts]:
    h = Hosts(tmp_path_factory.mktemp("peers"), model_path)
    yield h
    h.stop()


def test_b_models_are_listed_on_a_with_their_peer(hosts: Hosts) -> None:
    tag = _wait_listed(hosts.a.base_url, "smollm2")
    assert tag["routerd"]["peer"] == "b" and tag["routerd"]["host"] == hosts.b.base_url
    assert [p["kind"] for p in json.loads(_get(hosts.a.base_url, "/api/ps"))["routerd"]
            ["peers"]] == ["routerd"]  # kind auto, detected
    # On B the clash with its own smollm2 lists the peer's as ls/smollm2; A skips B's peers.
    b_tags = {m["name"]: m for m in json.loads(_get(hosts.b.base_url, "/api/tags",
                                                      key=PEER_KEY))["models"]}
    on_b = b_tags.get("ls/smollm2") or _wait_listed_b(hosts)
    assert on_b["routerd"]["peer"] == "ls"
    assert [m["name"] for m in json.loads(_get(hosts.a.base_url, "/api/tags"))["models"]] == \
        ["smollm2"]
    # What `routerd list --sources` prints from these tags (the CLI sends no API key yet).
    from routerd.discovery import format_sources

    listed = format_sources(json.loads(_get(hosts.a.base_url, "/api/tags"))["models"])
    assert re.search(r"^smollm2\s+peer:b\s+" + re.escape(hosts.b.base_url), listed, re.M), \
        listed
    ids = {m["id"]: m for m in json.loads(_get(hosts.a.base_url, "/v1/models"))["data"]}
    assert ids["smollm2"]["routerd"]["peer"] == "b"
    with pytest.raises(urllib.error.HTTPError) as e:  # A checks the client's key itself
        _get(hosts.a.base_url, "/api/tags", key=PEER_KEY)
    assert e.value.code == 401


def test_sdks_and_langchain_reach_b_through_a_streamed_with_the_peers_key(hosts: Hosts) -> None:
    import anthropic
    import ollama
    import openai
    from langchain_ollama import ChatOllama
    from langchain_openai import ChatOpenAI

    base = hosts.a.base_url
    _wait_listed(base, "smollm2")
    auth = {"Authorization": f"Bearer {CLIENT_KEY}"}
    ol = ollama.Client(host=base, headers=auth)
    parts = list(ol.chat(model="smollm2", messages=HI, stream=True,
                         options={"num_predict": 8}))
    assert parts[-1]["done"] and "".join(p["message"]["content"] for p in parts)
    ai = openai.OpenAI(base_url=base + "/v1", api_key=CLIENT_KEY, max_retries=0)
    chunks = list(ai.chat.completions.create(model="b/smollm2", messages=HI, max_tokens=8,
                                             stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    an = anthropic.Anthropic(base_url=base, api_key=CLIENT_KEY, max_retries=0)
    with an.messages.stream(model="smollm2", max_tokens=8, messages=HI) as s:
        assert "".join(s.text_stream)
    assert "".join(c.content for c in ChatOllama(
        model="smollm2", base_url=base, num_predict=8, client_kwargs={"headers": auth}
    ).stream("Say hello."))
    assert "".join(c.content for c in ChatOpenAI(
        model="smollm2", base_url=base + "/v1", api_key=CLIENT_KEY, max_tokens=8,
        max_retries=0).stream("Say hello."))


def test_llama_server_and_openai_kind_peers_serve_an_ollama_client(hosts: Hosts) -> None:
    import ollama

    base = hosts.a2.base_url
    ol = ollama.Client(host=base, headers={"Authorization": f"Bearer {CLIENT_KEY}"})
    deadline = time.monotonic() + 30  # every peer polled once
    while time.monotonic() < deadline:
        if all(p["up"] for p in json.loads(_get(base, "/api/ps"))["routerd"]["peers"]):
            break
        time.sleep(0.1)
    for name in ("ls/smollm2", "oa-smollm2"):
        parts = list(ol.chat(model=name, messages=HI, stream=True, options={"num_predict": 8}))
        assert parts[-1]["done"], name
        assert "".join(p["message"]["content"] for p in parts), name
    ps = json.loads(_get(base, "/api/ps"))
    kinds = {p["name"]: p["kind"] for p in ps["routerd"]["peers"]}
    assert kinds == {"b": "routerd", "ls": "llama-server", "oa": "openai"}


async def _streams(base: str, n: int, key: str = CLIENT_KEY) -> list[str]:
    import openai

    ai = openai.AsyncOpenAI(base_url=base + "/v1", api_key=key, max_retries=0)

    async def one() -> str:
        out = await ai.chat.completions.create(model="smollm2", messages=HI, max_tokens=8,
                                               stream=True)
        return "".join([c.choices[0].delta.content or "" async for c in out if c.choices])

    try:
        return await asyncio.wait_for(asyncio.gather(*(one() for _ in range(n))), 300)
    finally:
        await ai.close()


def test_replicas_on_two_hosts_share_32_streams_and_one_removed_takes_none(hosts: Hosts) -> None:
    base = hosts.a2.base_url
    deadline = time.monotonic() + 30  # both peers polled at least once
    while time.monotonic() < deadline:
        tag = _wait_listed(base, "smollm2")
        if {p["peer"] for p in tag["routerd"]["peers"]} == {"b", "ls"}:
            break
        time.sleep(0.1)
    assert {p["peer"] for p in tag["routerd"]["peers"]} == {"b", "ls"}
    before = _peer_requests(base)
    answers = asyncio.run(_streams(base, 32))
    assert len(answers) == 32 and all(answers)
    after = _peer_requests(base)
    used = {p: after.get(p, 0) - before.get(p, 0) for p in ("b", "ls")}
    print(f"replicas: 32 streams split {used}")
    assert used["b"] > 0 and used["ls"] > 0 and sum(used.values()) == 32
    # ls removed (SIGHUP): every request goes to b.
    full = json.loads(json.dumps(__import__("yaml").safe_load(hosts.a2.config_path.read_text())))
    hosts.a2.reload({"peers": [p for p in full["peers"] if p["name"] != "ls"]})
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        tag = _wait_listed(base, "smollm2")
        if {p["peer"] for p in tag["routerd"]["peers"]} == {"b"}:
            break
        time.sleep(0.1)
    before = _peer_requests(base)
    assert "ls" not in before  # its series went with it
    assert all(asyncio.run(_streams(base, 8)))
    assert _peer_requests(base)["b"] - before["b"] == 8


def test_a_local_engine_and_a_peer_replica_share_32_streams(hosts: Hosts) -> None:
    base = hosts.b.base_url
    _wait_listed_b(hosts)
    before = _peer_requests(base).get("ls", 0)
    answers = asyncio.run(_streams(base, 32, key=PEER_KEY))
    assert len(answers) == 32 and all(answers)
    to_peer = _peer_requests(base)["ls"] - before
    print(f"replicas: 32 streams on B: {32 - to_peer:.0f} local, {to_peer:.0f} to peer ls")
    assert 0 < to_peer < 32


def test_b_killed_mid_stream_ends_in_band_then_503_then_served_again(hosts: Hosts) -> None:
    base, b = hosts.a.base_url, hosts.b
    _wait_listed(base, "smollm2")
    resp = _post(base, "/v1/chat/completions", {
        "model": "smollm2", "stream": True, "max_tokens": 1000,
        "messages": [{"role": "user", "content": "Write a very long story about a cat."}]})
    assert resp.readline().startswith(b"data:")
    killed = time.monotonic()
    b.proc.send_signal(signal.SIGKILL)
    rest = resp.read()  # ends: routerd closes the stream after its error event
    cut = time.monotonic() - killed
    events = [json.loads(line[5:]) for line in rest.split(b"\n")
              if line.startswith(b"data:") and line[5:].strip() != b"[DONE]"]
    assert "error" in events[-1], rest[-500:]
    t0 = time.monotonic()
    with pytest.raises(urllib.error.HTTPError) as e:
        _post(base, "/api/chat", {"model": "smollm2", "messages": HI, "stream": False})
    refused = time.monotonic() - t0
    assert e.value.code == 503 and int(e.value.headers["Retry-After"]) >= 1
    metrics = _get(base, "/metrics").decode()
    assert 'routerd_peer_up{peer="b"} 0.0' in metrics
    assert float(re.search(r'^routerd_peer_failures_total\{peer="b"\} (\S+)$', metrics,
                           re.M)[1]) >= 1
    b.proc.wait(10)
    b._log.close()
    hosts.b = Daemon(_b_config(hosts.work / "b", hosts.model_path, hosts.ls_url),
                     hosts.work / "b", port=b.port)
    restarted = time.monotonic()  # B answers; its model loads on the first request
    up_at = None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with _post(base, "/api/chat", {"model": "smollm2", "messages": HI, "stream": False,
                                           "options": {"num_predict": 4}}) as r:
                assert json.loads(r.read())["done"]
                up_at = time.monotonic() - restarted
                break
        except urllib.error.HTTPError as err:
            assert err.code == 503
            time.sleep(0.1)
    assert up_at is not None, hosts.a.log()
    print(f"peer down: in-band error {cut:.2f}s after the kill, 503 in {refused * 1000:.0f} ms,"
          f" served again {up_at:.2f}s after B was up (A polls B every 1 s)")
