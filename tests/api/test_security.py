"""The LAN guards in routerd.api.security, through a tiny aiohttp app: every 4xx path,
preflights, loopback exemption, hashed keys, model limits, upstream path confinement, TLS,
and that the server keeps serving after each rejection."""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yarl
from aiohttp import web

from routerd.api import security
from routerd.api.security import (
    Handler,
    KeyRing,
    check_model_allowed, client_max_size, load_api_keys, security_middlewares, upstream_path,
)
from routerd.config import AuthConfig, Config, ConfigError, TlsConfig
from routerd.errors import BadRequest, RouterdError
from routerd.tlsctx import ssl_context

pytestmark = pytest.mark.timeout(30)
MAX_BODY = 1024
PEER = "X-Test-Peer"  # the test app's own header: pretend the request came from this address


@web.middleware
async def render_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except RouterdError as e:
        body = {"error": {"message": e.message, "type": e.type, "code": e.code}}
        return web.json_response(body, status=e.status, headers=e.headers)


@web.middleware
async def fake_peer(request: web.Request, handler: Handler) -> web.StreamResponse:
    peer = request.headers.get(PEER)
    return await handler(request.clone(remote=peer) if peer else request)


async def chat(request: web.Request) -> web.Response:
    body = await request.json()
    check_model_allowed(request, body["model"], *body.get("aliases", []))
    return web.json_response({"ok": True})


async def blob(request: web.Request) -> web.Response:
    size = 0
    async for chunk in request.content.iter_chunked(65536):
        size += len(chunk)
    return web.json_response({"size": size}, status=201)


async def stream(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse()
    await resp.prepare(request)
    await resp.write(b"data: 1\n\n")
    await resp.write_eof()
    return resp


async def upstream(request: web.Request) -> web.Response:
    return web.json_response({"path": upstream_path(request.match_info["path"])})


def text(body: str) -> Any:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(text=body)
    return handler


def json_body(body: dict[str, Any]) -> Any:
    async def handler(request: web.Request) -> web.Response:
        return web.json_response(body)
    return handler


def make_app(config: Config) -> web.Application:
    keyring = security.keyring_from_config(config)
    app = web.Application(
        middlewares=[render_errors, fake_peer, *security_middlewares(config, keyring)],
        client_max_size=client_max_size(config),
    )
    app.on_response_prepare.append(security.cors_response_hook(config))
    app.router.add_routes([
        web.get("/", text("routerd is running")), web.get("/health", text("ok")),
        web.get("/api/version", text('{"version": "0"}')),
        web.get("/api/tags", json_body({"models": []})),
        web.get("/v1/models", json_body({"object": "list", "data": []})),
        web.post("/api/chat", chat), web.post("/api/blobs/{digest}", blob),
        web.get("/stream", stream), web.get("/upstream/{model}/{path:.*}", upstream),
    ])
    return app


@pytest.fixture
def keys_file(tmp_path: Path) -> Path:
    hashed = hashlib.sha256(b"hashed-key-2").hexdigest()
    path = tmp_path / "keys"
    path.write_text(
        "# routerd keys\n\n"
        "plain-key-1\n"
        f"sha256:{hashed}   models=smollm2,tiny:q4  # the kids' laptop\n"
        "plain-key-3 models=other\n"
    )
    return path


@pytest.fixture
def make_client(aiohttp_client: Any, keys_file: Path) -> Any:
    async def make(**overrides: Any) -> Any:
        base = Config(max_body=MAX_BODY, auth=AuthConfig(api_keys_file=str(keys_file)))
        return await aiohttp_client(make_app(replace(base, **overrides)))
    return make


async def assert_serving(client: Any) -> None:
    resp = await client.post("/api/chat", json={"model": "smollm2"},
                             headers={"Authorization": "Bearer plain-key-1"})
    assert resp.status == 200, await resp.text()


async def assert_error(resp: aiohttp.ClientResponse, status: int, code: str) -> dict[str, Any]:
    body: dict[str, Any] = await resp.json()
    assert resp.status == status, body
    assert body["error"]["code"] == code
    return body


# ---------------------------------------------------------------- keys file


def test_load_api_keys(keys_file: Path) -> None:
    ring = load_api_keys(keys_file)
    assert len(ring) == 3
    plain = ring.check("plain-key-1")
    hashed = ring.check("hashed-key-2")
    assert plain is not None and plain.models is None and plain.allows("anything")
    assert hashed is not None and hashed.label.endswith(":4")
    assert hashed.allows("smollm2") and hashed.allows("smollm2:latest")
    assert hashed.allows("tiny:q4") and not hashed.allows("tiny") and not hashed.allows("other")
    assert ring.check("plain-key-") is None and ring.check("") is None
    assert ring.check("sha256:" + hashlib.sha256(b"hashed-key-2").hexdigest()) is None


@pytest.mark.parametrize("line, why", [
    ("sha256:abc", "64 hex"),
    ("key models=", "invalid model list"),
    ("key models=a,,b", "invalid model list"),
    ("key extra", "unexpected"),
    ("key models=a models=b", "unexpected"),
    ("clé", "visible ASCII"),
    ("models=a", "visible ASCII"),
])
def test_load_api_keys_bad_line(tmp_path: Path, line: str, why: str) -> None:
    path = tmp_path / "keys"
    path.write_text(f"# header\ngood-key\n{line}\n", encoding="utf-8")
    with pytest.raises(ConfigError) as e:
        load_api_keys(path)
    assert str(path) in str(e.value) and "line 3" in str(e.value) and why in str(e.value)


def test_load_api_keys_duplicate_and_unreadable(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text("k1\nsha256:" + hashlib.sha256(b"k1").hexdigest() + "\n")
    with pytest.raises(ConfigError, match="line 2: same key as line 1"):
        load_api_keys(path)
    with pytest.raises(ConfigError, match="auth.api_keys_file: cannot read"):
        load_api_keys(tmp_path / "missing")


# ---------------------------------------------------------------- auth


async def test_auth_paths(make_client: Any) -> None:
    client = await make_client()
    remote = {PEER: "192.0.2.7"}
    resp = await client.post("/api/chat", json={"model": "smollm2"}, headers=remote)
    body = await assert_error(resp, 401, "invalid_api_key")
    assert "missing" in body["error"]["message"] and resp.headers["WWW-Authenticate"]
    await assert_serving(client)
    for header in ("Bearer wrong", "Basic cGxhaW4ta2V5LTE=", "Bearer", "plain-key-1"):
        resp = await client.post("/api/chat", json={"model": "smollm2"},
                                 headers={**remote, "Authorization": header})
        await assert_error(resp, 401, "invalid_api_key")
        await assert_serving(client)
    for key in ("plain-key-1", "hashed-key-2"):
        resp = await client.post("/api/chat", json={"model": "smollm2"},
                                 headers={**remote, "Authorization": f"bearer {key}"})
        assert resp.status == 200


async def test_real_clients_send_bearer(make_client: Any, keys_file: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """What the ollama and openai Python clients send is what the auth middleware reads."""
    import ollama
    import openai
    client = await make_client(auth=AuthConfig(str(keys_file), exempt_loopback=False))
    base = f"http://{client.host}:{client.port}"
    monkeypatch.setenv("OLLAMA_API_KEY", "plain-key-1")
    assert (await ollama.AsyncClient(host=base).list()).models == []
    monkeypatch.setenv("OLLAMA_API_KEY", "wrong")
    with pytest.raises(ollama.ResponseError) as e:
        await ollama.AsyncClient(host=base).list()
    assert e.value.status_code == 401
    good = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="hashed-key-2", max_retries=0)
    assert [m async for m in good.models.list()] == []
    bad = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        await bad.models.list()
    await good.close()
    await bad.close()


async def test_model_limits(make_client: Any) -> None:
    client = await make_client()
    headers = {"Authorization": "Bearer hashed-key-2"}
    resp = await client.post("/api/chat", json={"model": "other"}, headers=headers)
    await assert_error(resp, 403, "forbidden")
    await assert_serving(client)
    for model, aliases in (("smollm2", []), ("tiny:q4", []), ("smol", ["smollm2"])):
        resp = await client.post("/api/chat", json={"model": model, "aliases": aliases},
                                 headers=headers)
        assert resp.status == 200, model


async def test_loopback_exemption(make_client: Any, keys_file: Path) -> None:
    client = await make_client()
    assert (await client.post("/api/chat", json={"model": "x"})).status == 200
    # a loopback client that sends a key is checked: wrong → 401, right → limits apply
    resp = await client.post("/api/chat", json={"model": "x"},
                             headers={"Authorization": "Bearer nope"})
    await assert_error(resp, 401, "invalid_api_key")
    resp = await client.post("/api/chat", json={"model": "x"},
                             headers={"Authorization": "Bearer plain-key-3"})
    await assert_error(resp, 403, "forbidden")
    strict = await make_client(auth=AuthConfig(str(keys_file), exempt_loopback=False))
    await assert_error(await strict.post("/api/chat", json={"model": "x"}), 401, "invalid_api_key")
    for peer in ("::1", "::ffff:127.0.0.1", "127.9.9.9"):
        resp = await client.post("/api/chat", json={"model": "x"}, headers={PEER: peer})
        assert resp.status == 200, peer


async def test_public_paths_and_no_keys(make_client: Any) -> None:
    client = await make_client()
    remote = {PEER: "192.0.2.7"}
    for path in ("/", "/health"):
        assert (await client.get(path, headers=remote)).status == 200, path
        wrong = {**remote, "Authorization": "Bearer wrong"}
        assert (await client.get(path, headers=wrong)).status == 200, path
    for path in ("/api/version", "/health?model=big"):
        await assert_error(await client.get(path, headers=remote), 401, "invalid_api_key")
    open_client = await make_client(auth=AuthConfig())
    resp = await open_client.post("/api/chat", json={"model": "x"}, headers=remote)
    assert resp.status == 200


# ---------------------------------------------------------------- Host


@pytest.mark.parametrize("host, status", [
    ("localhost:11434", 200), ("LOCALHOST.", 200), ("app.localhost", 200),
    ("127.0.0.1", 200), ("[::1]:8080", 200), ("myname.lan:11434", 200),
    ("evil.example:11434", 403), ("192.168.1.5", 403), ("localhost.evil.example", 403),
    ("[::1", 403),
])
async def test_host_check_loopback(make_client: Any, host: str, status: int) -> None:
    client = await make_client(allowed_hosts=("myname.lan",))
    resp = await client.get("/", headers={"Host": host})
    if status == 403:
        await assert_error(resp, 403, "forbidden")
    assert resp.status == status
    await assert_serving(client)


async def test_host_check_own_hostname(make_client: Any) -> None:
    import socket
    client = await make_client()
    resp = await client.get("/", headers={"Host": f"{socket.gethostname()}:11434"})
    assert resp.status == 200


async def test_host_check_non_loopback(make_client: Any) -> None:
    anyhost = await make_client(host="0.0.0.0")
    assert (await anyhost.get("/", headers={"Host": "whatever.example"})).status == 200
    listed = await make_client(host="0.0.0.0", allowed_hosts=("*.home.arpa",))
    for host, status in (("routerd.home.arpa", 200), ("192.168.1.5:11434", 200),
                         ("localhost", 200), ("evil.example", 403)):
        assert (await listed.get("/", headers={"Host": host})).status == status, host


# ---------------------------------------------------------------- CORS


async def test_cors(make_client: Any) -> None:
    client = await make_client()
    for origin in ("http://localhost:3000", "http://127.0.0.1", "app://obsidian.md",
                   "http://[::1]:8080"):
        resp = await client.get("/", headers={"Origin": origin})
        assert resp.status == 200, origin
        assert resp.headers["Access-Control-Allow-Origin"] == origin
        assert "Origin" in resp.headers["Vary"]
    assert "Access-Control-Allow-Origin" not in (await client.get("/")).headers
    for origin in ("https://evil.example", "null", "http://localhost:3000.evil.example",
                   "http://localhost.evil.example", "http://localhost:abc"):
        resp = await client.get("/", headers={"Origin": origin})
        await assert_error(resp, 403, "forbidden")
        assert "Access-Control-Allow-Origin" not in resp.headers
        await assert_serving(client)


async def test_cors_streams_and_errors_carry_headers(make_client: Any) -> None:
    client = await make_client()
    origin = {"Origin": "http://localhost:5173"}
    resp = await client.get("/stream", headers=origin)
    assert resp.headers["Access-Control-Allow-Origin"] == origin["Origin"]
    assert await resp.read() == b"data: 1\n\n"
    resp = await client.post("/api/chat", json={"model": "x"},
                             headers={**origin, PEER: "192.0.2.7"})
    await assert_error(resp, 401, "invalid_api_key")
    assert resp.headers["Access-Control-Allow-Origin"] == origin["Origin"]


async def test_cors_preflight(make_client: Any) -> None:
    client = await make_client()
    resp = await client.options("/api/chat", headers={
        "Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os",
        "Access-Control-Request-Private-Network": "true", PEER: "192.0.2.7",
    })
    assert resp.status == 204
    assert resp.headers["Access-Control-Allow-Origin"] == "http://localhost:3000"
    allowed = resp.headers["Access-Control-Allow-Headers"].lower()
    assert {"authorization", "content-type", "x-stainless-os"} <= set(allowed.split(", "))
    assert "POST" in resp.headers["Access-Control-Allow-Methods"]
    assert resp.headers["Access-Control-Allow-Private-Network"] == "true"
    resp = await client.options("/api/chat", headers={
        "Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
    await assert_error(resp, 403, "forbidden")
    await assert_serving(client)


# ---------------------------------------------------------------- body cap


async def test_body_cap_content_length(make_client: Any) -> None:
    client = await make_client()
    resp = await client.post("/api/chat", data=b"x" * (MAX_BODY + 1),
                             headers={"Content-Type": "application/json"})
    await assert_error(resp, 413, "payload_too_large")
    await assert_serving(client)


async def test_body_cap_answers_before_reading(make_client: Any) -> None:
    client = await make_client()
    reader, writer = await asyncio.open_connection(client.host, client.port)
    try:
        writer.write(b"POST /api/chat HTTP/1.1\r\nHost: localhost\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 1000000000\r\n\r\n{")
        await writer.drain()
        status = await asyncio.wait_for(reader.readline(), 5)
        assert status.startswith(b"HTTP/1.1 413"), status
    finally:
        writer.close()
    await assert_serving(client)


async def test_body_cap_chunked(make_client: Any) -> None:
    client = await make_client()

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(8):
            yield b"x" * 512

    resp = await client.post("/api/chat", data=chunks())
    await assert_error(resp, 413, "payload_too_large")
    await assert_serving(client)


async def test_blob_upload_exempt(make_client: Any) -> None:
    client = await make_client()
    resp = await client.post("/api/blobs/sha256:ab", data=b"g" * (MAX_BODY * 64))
    assert resp.status == 201 and (await resp.json())["size"] == MAX_BODY * 64
    resp = await client.post("/api/blobs/sha256:ab", data=b"g" * 10,
                             headers={PEER: "192.0.2.7"})
    await assert_error(resp, 401, "invalid_api_key")


# ---------------------------------------------------------------- /upstream paths


@pytest.mark.parametrize("raw, expected", [
    ("props", "/props"), ("", "/"), ("/slots/0", "/slots/0"), ("a//b/./c", "/a/b/c"),
    ("v1/chat%20completions", "/v1/chat%20completions"), ("a%2Fb", "/a/b"),
])
def test_upstream_path_ok(raw: str, expected: str) -> None:
    assert upstream_path(raw) == expected


@pytest.mark.parametrize("raw", [
    "..", "../etc/passwd", "a/../../b", "%2e%2e/x", "%2E%2e%2fx", "%252e%252e/x", "a/..;/b",
    "a\\b", "a%5cb", "a%00b", "a\x00b", "a%0ab", "http://evil.example/x", "//evil.example/x",
    "%2f%2fevil.example", "file:/etc/passwd", "%ff", "%25252525252e",
])
def test_upstream_path_rejected(raw: str) -> None:
    with pytest.raises(BadRequest):
        upstream_path(raw)


async def test_upstream_route(make_client: Any) -> None:
    client = await make_client()
    resp = await client.get("/upstream/m/slots/0?x=1")
    assert (await resp.json())["path"] == "/slots/0"
    base = f"http://{client.host}:{client.port}"
    async with aiohttp.ClientSession() as session:
        # one extra slash stays a path on the worker, never a host
        url = yarl.URL(f"{base}/upstream/m//evil.example/x", encoded=True)
        async with session.get(url) as resp:
            assert (await resp.json())["path"] == "/evil.example/x"
        for raw in ("/upstream/m/%2e%2e/%2e%2e/etc/passwd", "/upstream/m/a/../../x",
                    "/upstream/m///evil.example/x", "/upstream/m/a%5c..%5cb"):
            url = yarl.URL(f"{base}{raw}", encoded=True)
            async with session.get(url) as resp:
                await assert_error(resp, 400, "invalid_request")
    await assert_serving(client)


# ---------------------------------------------------------------- exposure warning


class _Log:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def warning(self, event: str, **fields: Any) -> None:
        self.events.append((event, fields))


def test_warn_if_exposed(keys_file: Path) -> None:
    log = _Log()
    ring = load_api_keys(keys_file)
    assert not security.warn_if_exposed(Config(), None, log)
    assert not security.warn_if_exposed(Config(host="::1"), None, log)
    assert not security.warn_if_exposed(Config(host="0.0.0.0"), ring, log)
    assert security.warn_if_exposed(Config(host="0.0.0.0"), None, log)
    assert not security.warn_if_exposed(Config(host="192.168.1.5"), KeyRing((), "k"), log)
    assert [e for e, _ in log.events] == ["security.exposed_without_keys",
                                          "security.keys_file_empty"]


# ---------------------------------------------------------------- TLS


def make_cert(directory: Path, name: str) -> tuple[Path, Path]:
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True, timeout=30,
    )
    return cert, key


@pytest.fixture
def cert_pair(tmp_path: Path) -> tuple[Path, Path]:
    assert shutil.which("openssl"), "openssl missing (Debian's openssl package)"
    return make_cert(tmp_path, "server")


async def test_tls_serves(aiohttp_server: Any, cert_pair: tuple[Path, Path]) -> None:
    cert, key = cert_pair
    ctx = ssl_context(Config(tls=TlsConfig(str(cert), str(key))))
    assert ctx is not None
    server = await aiohttp_server(make_app(Config()), ssl=ctx)
    client_ctx = ssl.create_default_context(cafile=str(cert))
    async with aiohttp.ClientSession() as session:
        async with session.get(f"https://127.0.0.1:{server.port}/", ssl=client_ctx) as resp:
            assert resp.status == 200 and await resp.text() == "routerd is running"


def test_tls_errors(tmp_path: Path, cert_pair: tuple[Path, Path]) -> None:
    cert, key = cert_pair
    assert ssl_context(Config()) is None
    with pytest.raises(ConfigError, match="tls.cert_file: cannot read"):
        ssl_context(Config(tls=TlsConfig(str(tmp_path / "nope.pem"), str(key))))
    with pytest.raises(ConfigError, match="tls.key_file: cannot read"):
        ssl_context(Config(tls=TlsConfig(str(cert), str(tmp_path / "nope.pem"))))
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match="tls: cannot load"):
        ssl_context(Config(tls=TlsConfig(str(garbage), str(key))))
    _, other_key = make_cert(tmp_path, "other")
    with pytest.raises(ConfigError, match="tls: cannot load"):
        ssl_context(Config(tls=TlsConfig(str(cert), str(other_key))))

