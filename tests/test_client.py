"""The CLI client commands against a tiny aiohttp app faking the daemon's Ollama API."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from aiohttp import web

from routerd.client import api as client

NOW = datetime.now(timezone.utc)


class FakeDaemon:
    def __init__(self) -> None:
        self.bodies: list[tuple[str, Any]] = []
        self.log_query: dict[str, str] = {}

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/api/tags", self.tags)
        app.router.add_get("/api/ps", self.ps)
        app.router.add_post("/api/show", self.show)
        app.router.add_post("/api/generate", self.generate)
        app.router.add_post("/api/chat", self.chat)
        app.router.add_get("/api/logs", self.logs)
        return app

    async def tags(self, request: web.Request) -> web.Response:
        return web.json_response({"models": [{
            "name": "smollm2:latest", "model": "smollm2:latest", "size": 98_000_000,
            "digest": "0123456789abcdef0123", "modified_at": (NOW - timedelta(days=2)).isoformat(),
        }]})

    async def ps(self, request: web.Request) -> web.Response:
        return web.json_response({"models": [{
            "name": "smollm2", "model": "smollm2", "size": 300_000_000, "size_vram": 0,
            "digest": "abcdef0123456789", "context_length": 4096,
            "expires_at": (NOW + timedelta(hours=4, minutes=30)).isoformat(),
        }]})

    async def show(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.bodies.append(("show", body))
        if body["model"] != "smollm2":
            return web.json_response({"error": f"model '{body['model']}' not found"}, status=404)
        return web.json_response({
            "details": {"family": "llama", "parameter_size": "134.52M",
                        "quantization_level": "Q4_1"},
            "model_info": {"general.architecture": "llama", "llama.context_length": 8192},
            "capabilities": ["completion"], "parameters": 'stop "<|im_end|>"',
        })

    async def generate(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(("generate", body))
        if not body.get("stream"):
            return web.json_response({"model": body["model"], "response": "", "done": True,
                                      "done_reason": "unload"})
        if body["prompt"] == "fail":
            return await ndjson(request, [{"response": "par"}, {"error": "worker crashed"}])
        parts = [{"response": w, "done": False} for w in ("Hello", " wor", "ld")]
        return await ndjson(request, [*parts, {"response": "", "done": True}])

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(("chat", body))
        n = len(body["messages"])
        return await ndjson(request, [{"message": {"role": "assistant", "content": "turn "}},
                                      {"message": {"role": "assistant", "content": str(n)}},
                                      {"message": {"role": "assistant", "content": ""},
                                       "done": True}])

    async def logs(self, request: web.Request) -> web.StreamResponse:
        self.log_query = dict(request.query)
        if request.query.get("model") != "smollm2":
            return web.json_response({"error": {"message": "no such model",
                                                 "type": "not_found_error"}}, status=404)
        resp = web.StreamResponse(headers={"Content-Type": "text/plain"})
        await resp.prepare(request)
        for line in ("line one\n", "line tw", "o\n"):
            await resp.write(line.encode())
        await resp.write_eof()
        return resp


async def ndjson(request: web.Request, objs: list[dict[str, Any]]) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await resp.prepare(request)
    for obj in objs:
        await resp.write(json.dumps(obj).encode() + b"\n")
        await asyncio.sleep(0)
    await resp.write_eof()
    return resp


@pytest.fixture
async def daemon(aiohttp_server: Any) -> tuple[FakeDaemon, str]:
    fake = FakeDaemon()
    server = await aiohttp_server(fake.app())
    return fake, f"http://127.0.0.1:{server.port}"


def lines_reader(lines: list[str]) -> Any:
    it: Iterator[str] = iter(lines)

    def read(prompt: str) -> str:
        try:
            return next(it)
        except StopIteration:
            raise EOFError from None
    return read


async def test_list(daemon: tuple[FakeDaemon, str], capsys: pytest.CaptureFixture[str]) -> None:
    assert await client.list_models(daemon[1]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["NAME", "ID", "SIZE", "MODIFIED"]
    assert out[1].split() == ["smollm2:latest", "0123456789ab", "98", "MB", "2", "days", "ago"]


async def test_ps(daemon: tuple[FakeDaemon, str], capsys: pytest.CaptureFixture[str]) -> None:
    assert await client.ps(daemon[1]) == 0
    header, row = capsys.readouterr().out.splitlines()
    assert header.split() == ["NAME", "ID", "SIZE", "PROCESSOR", "CONTEXT", "UNTIL"]
    assert row.index("100% CPU") == header.index("PROCESSOR")
    assert row.split() == ["smollm2", "abcdef012345", "300", "MB", "100%", "CPU", "4096",
                           "4", "hours", "from", "now"]


async def test_show_and_not_found(daemon: tuple[FakeDaemon, str],
                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert await client.show(daemon[1], "smollm2") == 0
    out = capsys.readouterr().out
    assert "  Model\n    architecture" in out and "    context length    8192\n" in out
    assert "Q4_1" in out and "  Capabilities\n    completion" in out and '"<|im_end|>"' in out
    assert await client.show(daemon[1], "nope") == 1
    assert capsys.readouterr().err == "Error: model 'nope' not found\n"


async def test_run_with_prompt_streams(daemon: tuple[FakeDaemon, str],
                                       capsys: pytest.CaptureFixture[str]) -> None:
    fake, base = daemon
    assert await client.run(base, "smollm2", "hi there") == 0
    assert capsys.readouterr().out == "Hello world\n"
    assert fake.bodies[-1] == ("generate", {"model": "smollm2", "prompt": "hi there",
                                            "stream": True})


async def test_run_in_band_error(daemon: tuple[FakeDaemon, str],
                                 capsys: pytest.CaptureFixture[str]) -> None:
    assert await client.run(daemon[1], "smollm2", "fail") == 1
    captured = capsys.readouterr()
    assert captured.out == "par\n" and captured.err == "Error: worker crashed\n"


async def test_chat_loop_keeps_history(daemon: tuple[FakeDaemon, str],
                                       capsys: pytest.CaptureFixture[str]) -> None:
    fake, base = daemon
    reader = lines_reader(["hi", "", "/clear", "/nope", '"""two', 'lines"""', "/bye", "never"])
    assert await client.run(base, "smollm2", None, read_line=reader) == 0
    chats = [body for kind, body in fake.bodies if kind == "chat"]
    assert [len(c["messages"]) for c in chats] == [1, 1]  # /clear emptied the history
    assert chats[1]["messages"] == [{"role": "user", "content": "two\nlines"}]
    out = capsys.readouterr().out
    assert "turn 1\n" in out and "Cleared session context" in out and "Unknown command" in out
    reader = lines_reader(["a", "b"])  # EOF ends the loop
    assert await client.run(base, "smollm2", None, read_line=reader) == 0
    last = [body for kind, body in fake.bodies if kind == "chat"][-1]
    assert last["messages"] == [{"role": "user", "content": "a"},
                                {"role": "assistant", "content": "turn 1"},
                                {"role": "user", "content": "b"}]


async def test_stop(daemon: tuple[FakeDaemon, str]) -> None:
    fake, base = daemon
    assert await client.stop(base, "smollm2") == 0
    assert fake.bodies[-1] == ("generate", {"model": "smollm2", "prompt": "", "keep_alive": 0,
                                            "stream": False})


async def test_logs(daemon: tuple[FakeDaemon, str], capsys: pytest.CaptureFixture[str]) -> None:
    fake, base = daemon
    assert await client.logs(base, "smollm2", follow=True) == 0
    assert capsys.readouterr().out == "line one\nline two\n"
    assert fake.log_query == {"model": "smollm2", "follow": "1"}
    assert await client.logs(base, "other") == 1
    assert fake.log_query == {"model": "other"}
    assert capsys.readouterr().err == "Error: no such model\n"


async def test_daemon_not_running(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        base = f"http://127.0.0.1:{s.getsockname()[1]}"  # bound, not listening: refused
        assert await client.ps(base) == 1
    err = capsys.readouterr().err
    assert err.startswith("Error: could not connect to routerd at " + base)


def test_resolve_base(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ROUTERD_HOST", raising=False)
    assert client.resolve_base() == "http://127.0.0.1:11434"
    monkeypatch.setenv("ROUTERD_HOST", "0.0.0.0:8080")
    assert client.resolve_base() == "http://127.0.0.1:8080"
    assert client.resolve_base("http://box.lan/") == "http://box.lan:11434"
    assert client.resolve_base("https://box.lan:9/x/") == "https://box.lan:9/x"


def test_formatting() -> None:
    assert [client.human_bytes(n) for n in (512, 1_000_000_000, 4_700_000_000, 98_765_432)] == [
        "512 B", "1 GB", "4.7 GB", "98 MB"]
    assert client.processor(100, 0) == "100% CPU"
    assert client.processor(100, 100) == "100% GPU"
    assert client.processor(400, 100) == "75%/25% CPU/GPU"
    assert client.human_time(None, "Never") == "Never"
    assert client.human_time(NOW + timedelta(days=365 * 100), "Never", NOW) == "Forever"
    assert client.human_time(NOW - timedelta(hours=3), "Never", NOW) == "3 hours ago"
    expired = {"name": "m", "size": 1, "expires_at": (NOW - timedelta(seconds=5)).isoformat()}
    assert client.format_ps([expired], NOW).splitlines()[1].endswith("Stopping...")
    assert client.parse_time("2024-06-01T12:34:56.123456789Z") == datetime(
        2024, 6, 1, 12, 34, 56, 123456, tzinfo=timezone.utc)
    assert client.error_message(500, '{"error": {"message": "boom"}}') == "boom"
    assert client.error_message(502, "") == "HTTP 502"


def test_cli_reads_routerd_host_like_the_client(monkeypatch: pytest.MonkeyPatch) -> None:
    """ROUTERD_HOST=http://box (no port) means box:11434 for every subcommand, as the
    client's resolve_base says: the CLI used to build its own URL and went to port 80."""
    from routerd import cli

    seen: list[str] = []

    async def fake_list(base: str) -> int:
        seen.append(base)
        return 0

    monkeypatch.setattr(client, "list_models", fake_list)
    monkeypatch.setenv("ROUTERD_HOST", "http://box")
    assert cli.main(["list"]) == 0
    monkeypatch.setenv("ROUTERD_HOST", "box:8080")
    assert cli.main(["list"]) == 0
    assert seen == ["http://box:11434", "http://box:8080"]
