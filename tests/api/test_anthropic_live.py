"""Faults a real engine cannot show, through the fake worker: Anthropic's `ping` while a cold
load waits, and an engine that dies mid-stream ending Anthropic and Responses streams with
their own in-band error."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from tests.conftest import Daemon, fake_model

ASK = {"max_tokens": 16, "stream": True, "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture(scope="module")
def d(tmp_path_factory: pytest.TempPathFactory) -> Daemon:
    daemon = Daemon({"models": {
        "slow": fake_model("--slow-start", "2.5"),
        "crash": fake_model("--crash-at-token", "3", "--tokens", "10", "--token-delay", "0.05"),
    }}, tmp_path_factory.mktemp("anthropic-live"))
    yield daemon  # type: ignore[misc]
    assert daemon.stop() == 0


def events(raw: str) -> list[str]:
    return [line[7:] for line in raw.splitlines() if line.startswith("event: ")]


def test_pings_while_a_cold_load_waits(d: Daemon) -> None:
    r = httpx.post(d.base_url + "/v1/messages", json={"model": "slow", **ASK}, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    names = events(r.text)
    assert names[:2] == ["message_start", "ping"]  # sent before the engine was ready
    assert names[-1] == "message_stop" and "content_block_delta" in names


def test_engine_death_mid_stream_is_in_band(d: Daemon) -> None:
    r = httpx.post(d.base_url + "/v1/messages", json={"model": "crash", **ASK}, timeout=60)
    names = events(r.text)
    assert names[0] == "message_start" and names[-1] == "error" and "message_stop" not in names
    last = json.loads(r.text.strip().splitlines()[-1][6:])
    assert last["type"] == "error" and last["error"]["type"] == "api_error"
    assert "engine" in last["error"]["message"]
    body = {"model": "crash", "input": "hi", "stream": True, "max_output_tokens": 16}
    r = httpx.post(d.base_url + "/v1/responses", json=body, timeout=60)
    names = events(r.text)
    assert names[0] == "response.created" and names[-1] == "response.failed"
    assert "response.completed" not in names


def test_errors_before_the_stream_are_statuses(d: Daemon) -> None:
    r = httpx.post(d.base_url + "/v1/messages", json={"model": "nope", **ASK}, timeout=30)
    assert r.status_code == 404
    assert r.json()["type"] == "error" and r.json()["error"]["type"] == "not_found_error"
    r = httpx.get(d.base_url + "/v1/responses/resp_" + "0" * 32, timeout=30)
    assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"
