"""Bad input gets a clear error in the route's dialect, and the daemon keeps serving
(in-process app, no engine needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from routerd.app import make_app
from routerd.config import parse_config


@pytest.fixture
async def client(aiohttp_client: Any, tmp_path: Path) -> Any:
    config = parse_config({"state_dir": str(tmp_path / "s"), "models_dir": str(tmp_path / "m"),
                           "memory": {"gpus": []}, "discovery": {
                               k: False for k in ("ollama", "gpt4all", "lmstudio",
                                                  "huggingface", "llama_cpp")},
                           "models": {"m": {"backend": "command", "command": ["false"]}}})
    return await aiohttp_client(make_app(config))


OLLAMA_CASES = [
    ("/api/chat", b"{bad json", 400, "invalid JSON"),
    ("/api/chat", b"[1, 2]", 400, "JSON object"),
    ("/api/chat", b'{"messages": []}', 400, "model is required"),
    ("/api/chat", b'{"model": 5, "messages": []}', 400, "model must be a string"),
    ("/api/chat", b'{"model": "m", "messages": "hi"}', 400, "messages must be a list"),
    ("/api/chat", b'{"model": "m", "messages": [{"role": "user", "content": "x"}], '
                  b'"stream": "yes"}', 400, "stream"),
    ("/api/generate", b'{"model": "m", "prompt": 7}', 400, "prompt must be a string"),
    ("/api/generate", b'{"model": "m", "prompt": "x", "keep_alive": "soon"}', 400, "duration"),
    ("/api/generate", b'{"model": "m", "prompt": "x", "options": []}', 400, "options"),
    ("/api/generate", b'{"model": "ghost", "prompt": "x"}', 404, "not found"),
    ("/api/show", b'{"model": "ghost"}', 404, "not found"),
]


@pytest.mark.parametrize("path,body,status,text", OLLAMA_CASES)
async def test_ollama_errors(client: Any, path: str, body: bytes, status: int,
                             text: str) -> None:
    r = await client.post(path, data=body, headers={"Content-Type": "application/json"})
    assert r.status == status
    err = (await r.json())["error"]
    assert isinstance(err, str) and text in err
    assert (await client.get("/")).status == 200  # still serving


@pytest.mark.parametrize("path,body,status,code", [
    ("/v1/chat/completions", b"{bad", 400, "invalid_request"),
    ("/v1/chat/completions", b'{"messages": []}', 400, "invalid_request"),
    ("/v1/chat/completions", b'{"model": "m", "stream": 1}', 400, "invalid_request"),
    ("/v1/chat/completions", b'{"model": "ghost", "messages": []}', 404, "model_not_found"),
    ("/v1/embeddings", b'{"model": "ghost", "input": "x"}', 404, "model_not_found"),
    ("/completion", b'{"model": "ghost", "prompt": "x"}', 404, "model_not_found"),
])
async def test_openai_errors(client: Any, path: str, body: bytes, status: int,
                             code: str) -> None:
    r = await client.post(path, data=body, headers={"Content-Type": "application/json"})
    assert r.status == status
    err = (await r.json())["error"]
    assert err["code"] == code and err["message"] and err["type"]


async def test_unknown_routes_in_dialect(client: Any) -> None:
    r = await client.get("/v1/nope")
    assert r.status == 404 and (await r.json())["error"]["code"] == "not_found"
    r = await client.get("/api/nope")
    assert r.status == 404 and "Not Found" in (await r.json())["error"]
    r = await client.get("/api/chat")
    assert r.status == 405 and r.headers["Allow"] == "POST"


async def test_load_failure_is_a_clear_error(client: Any) -> None:
    r = await client.post("/api/generate", json={"model": "m", "prompt": "x", "stream": False})
    assert r.status in (502, 503)
    assert "failed to load" in (await r.json())["error"]


async def test_version_and_root(client: Any) -> None:
    assert await (await client.get("/")).text() == "Ollama is running"
    assert (await client.head("/")).status == 200
    v = await (await client.get("/api/version")).json()
    assert v["version"] and v["routerd"]
