"""Issue 12's findings, each reproduced through the real HTTP surface of a live daemon (the
real llama-server where an engine is involved), and the access model a shared endpoint
needs: roles, per-key limits, keys and policy reloaded on SIGHUP."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any, Callable

import aiohttp
import pytest

from tests.conftest import Daemon, fake_model
from tests.test_faults import (REAL_TIMEOUTS, daemons, http, log_events, pid_gone,  # noqa: F401
                               pid_of, ps, real_model, wait_for)

pytestmark = pytest.mark.timeout(120)

ADMIN, ALICE, BOB, CAPPED = "admin-key-0", "alice-key-1", "bob-key-2", "capped-key-3"
LIMITED = "limited-admin-key-4"
KEYS = (f"{ADMIN}\n"  # no role: admin, as every key was before roles
        f"{LIMITED} models=a name=limited\n"
        f"{ALICE} role=user models=a name=alice\n"
        f"{BOB} role=user models=a pin=yes load_options=yes name=bob\n"
        f"{CAPPED} role=user rpm=3 streams=1 name=capped\n")


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def call(http: aiohttp.ClientSession, d: Daemon, method: str, path: str, key: str,
               body: Any = None) -> tuple[int, Any]:
    async with http.request(method, d.base_url + path, json=body, headers=bearer(key)) as r:
        text = await r.text()
        try:
            return r.status, json.loads(text) if text else None
        except ValueError:
            return r.status, text


@pytest.fixture
def keyed(daemons: Callable[..., Daemon], tmp_path: Path) -> Daemon:  # noqa: F811
    keys = tmp_path / "keys"
    keys.write_text(KEYS)
    return daemons({"a": fake_model(parallel=2), "b": fake_model()},
                   auth={"api_keys_file": str(keys), "exempt_loopback": False})


# ---------------------------------------------------------------- finding 1


def _key_env(pid: int) -> str | None:
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    for var in (b"LLAMA_API_KEY=", b"ROUTERD_WORKER_API_KEY="):
        for item in environ:
            if item.startswith(var):
                return item[len(var):].decode()
    return None


@pytest.mark.engine
@pytest.mark.parametrize("model", ["smollm2", "smollm2-lcp", "smollm2-lf"])
async def test_worker_key_is_not_in_the_world_readable_argv(daemon: Daemon, model: str,
                                                            http: aiohttp.ClientSession) -> None:  # noqa: F811
    status, _ = await call(http, daemon, "POST", "/api/generate", "",
                           {"model": model, "prompt": "hi", "stream": False,
                            "options": {"num_predict": 2}})
    assert status == 200
    pid = await pid_of(http, daemon, model)
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    assert "--api-key\0" not in cmdline + "\0"
    children = [pid] + [int(p) for p in os.popen(f"pgrep -g {pid}").read().split()]
    key = next((k for k in map(_key_env, children) if k), None)
    if model == "smollm2-lf":  # llamafile: a 0600 file, read at start and removed once ready
        assert "--api-key-file" in cmdline and key is None
        path = cmdline.split("--api-key-file\0", 1)[1].split("\0", 1)[0]
        assert not os.path.exists(path)
        return
    assert key and all(key not in Path(f"/proc/{p}/cmdline").read_text(errors="replace")
                       for p in children if os.path.exists(f"/proc/{p}"))
    port = next(m for m in (await ps(http, daemon))["models"] if m["name"] == model)
    del port  # the worker's port is not published; the key is what guards it


# ---------------------------------------------------------------- finding 2 and roles


async def test_a_key_limited_to_a_model_can_touch_no_other(keyed: Daemon,
                                                           http: aiohttp.ClientSession) -> None:  # noqa: F811
    """An admin key with `models=a` may manage `a` only: it could copy, overwrite, delete
    and read the logs of any model before."""
    for method, path, body in [
            ("POST", "/api/create", {"model": "a", "from": "b"}),
            ("POST", "/api/create", {"model": "b", "from": "a"}),
            ("POST", "/api/copy", {"source": "b", "destination": "a"}),
            ("POST", "/api/copy", {"source": "a", "destination": "b"}),
            ("DELETE", "/api/delete", {"model": "b"}),
            ("POST", "/api/pull", {"model": "b"}),
            ("POST", "/api/show", {"model": "b"}),
            ("GET", "/api/logs?model=b", None),
            ("POST", "/api/chat", {"model": "b", "messages": [{"role": "user", "content": "x"}]}),
            ("GET", "/v1/models/b", None)]:
        status, err = await call(http, keyed, method, path, LIMITED, body)
        assert status == 403 and "may not use model 'b'" in json.dumps(err), (path, status, err)
    assert (await call(http, keyed, "GET", "/api/logs?model=a", LIMITED))[0] == 200
    for key in (LIMITED, ALICE):  # lists show a limited key its models only
        status, body = await call(http, keyed, "GET", "/api/tags", key)
        assert status == 200 and {m["name"] for m in body["models"]} == {"a"}
        status, body = await call(http, keyed, "GET", "/v1/models", key)
        assert {m["id"] for m in body["data"]} == {"a"}
    await call(http, keyed, "POST", "/api/generate", ADMIN, {"model": "b"})
    _, body = await call(http, keyed, "GET", "/api/ps", ALICE)
    assert body["models"] == []
    _, body = await call(http, keyed, "GET", "/api/ps", ADMIN)
    assert [m["name"] for m in body["models"]] == ["b"]


async def test_user_keys_cannot_manage_admin_keys_can(keyed: Daemon,
                                                      http: aiohttp.ClientSession) -> None:  # noqa: F811
    admin_only = [("POST", "/api/pull", {"model": "a"}), ("DELETE", "/api/delete", {"model": "a"}),
                  ("POST", "/api/copy", {"source": "a", "destination": "a2"}),
                  ("POST", "/api/create", {"model": "a3", "from": "a"}),
                  ("GET", "/api/logs?model=a", None), ("POST", "/api/refresh", {}),
                  ("POST", "/upstream/a/lora-adapters", [{"id": 0, "scale": 0.5}]),
                  ("GET", "/metrics", None)]
    for method, path, body in admin_only:
        status, err = await call(http, keyed, method, path, ALICE, body)
        assert status == 403, (path, status, err)
        assert "admin" in json.dumps(err)
    status, _ = await call(http, keyed, "GET", "/api/logs?model=a", ADMIN)
    assert status == 200
    status, _ = await call(http, keyed, "GET", "/metrics", ADMIN)
    assert status == 200
    # a user key may not pin, unload or change load options unless its line says so
    gen = {"model": "a", "prompt": "", "stream": False}
    assert (await call(http, keyed, "POST", "/api/generate", ALICE, {**gen, "keep_alive": -1}))[0] == 403
    assert (await call(http, keyed, "POST", "/api/generate", ALICE, {**gen, "keep_alive": 0}))[0] == 403
    chat = {"model": "a", "messages": [{"role": "user", "content": "x"}], "stream": False}
    assert (await call(http, keyed, "POST", "/api/chat", ALICE,
                       {**chat, "options": {"num_ctx": 1024}}))[0] == 403
    assert (await call(http, keyed, "POST", "/api/chat", ALICE, chat))[0] == 200
    assert (await call(http, keyed, "POST", "/api/generate", BOB, {**gen, "keep_alive": -1}))[0] == 200
    assert (await call(http, keyed, "POST", "/api/chat", BOB,
                       {**chat, "options": {"num_ctx": 1024}}))[0] == 200


async def test_per_key_limits_answer_429_and_count_by_name(keyed: Daemon,
                                                           http: aiohttp.ClientSession) -> None:  # noqa: F811
    statuses = [(await call(http, keyed, "GET", "/api/tags", CAPPED))[0] for _ in range(4)]
    assert statuses == [200, 200, 200, 429]
    async with http.get(keyed.base_url + "/api/tags", headers=bearer(CAPPED)) as r:
        assert r.status == 429 and int(r.headers["Retry-After"]) >= 1
    status, text = await call(http, keyed, "GET", "/metrics", ADMIN)
    assert 'routerd_key_requests_total{key="capped",outcome="rate_limited"}' in text
    assert 'key="alice"' not in text or ALICE not in text
    assert CAPPED not in text and ADMIN not in text


async def test_concurrent_requests_per_key(daemons: Callable[..., Daemon],  # noqa: F811
                                           http: aiohttp.ClientSession, tmp_path: Path) -> None:  # noqa: F811
    keys = tmp_path / "keys"
    keys.write_text(f"{CAPPED} role=user streams=1 name=capped\n")
    d = daemons({"slow": fake_model("--tokens", "20", "--token-delay", "0.05", parallel=2)},
                auth={"api_keys_file": str(keys), "exempt_loopback": False})
    body = {"model": "slow", "messages": [{"role": "user", "content": "x"}], "stream": False}
    first = asyncio.ensure_future(call(http, d, "POST", "/api/chat", CAPPED, body))
    await asyncio.sleep(0.3)
    second = await call(http, d, "POST", "/api/chat", CAPPED, body)
    assert second[0] == 429 and "at once" in second[1]["error"]
    assert (await first)[0] == 200
    assert (await call(http, d, "POST", "/api/chat", CAPPED, body))[0] == 200


# ---------------------------------------------------------------- findings 3 and 4


async def test_sighup_revokes_keys_and_reloads_policy(keyed: Daemon,
                                                      http: aiohttp.ClientSession) -> None:  # noqa: F811
    assert (await call(http, keyed, "GET", "/api/tags", ALICE))[0] == 200
    keys_file = Path(keyed.config_path.parent.parent / "keys")
    keys_file.write_text(f"{ADMIN}\n")  # alice revoked
    keyed.reload({"cors_origins": ["http://dash.example"], "max_body": 2048,
                  "memory": {"ram_budget": "1GiB", "gpus": []}})
    await wait_for(lambda: log_events(keyed, "config.reloaded"), 10, "reloaded")
    assert (await call(http, keyed, "GET", "/api/tags", ALICE))[0] == 401
    assert (await call(http, keyed, "GET", "/api/tags", ADMIN))[0] == 200
    async with http.get(keyed.base_url + "/api/tags", headers={
            **bearer(ADMIN), "Origin": "http://dash.example"}) as r:
        assert r.status == 200 and r.headers["Access-Control-Allow-Origin"] == "http://dash.example"
    big = {"model": "a", "prompt": "x" * 4096}
    assert (await call(http, keyed, "POST", "/api/generate", ADMIN, big))[0] == 413
    _, body = await call(http, keyed, "GET", "/api/ps", ADMIN)
    assert body["routerd"]["budget"]["ram"] == 1 << 30


async def test_a_reload_whose_keys_file_breaks_changes_nothing(keyed: Daemon,
                                                               http: aiohttp.ClientSession) -> None:  # noqa: F811
    keys_file = Path(keyed.config_path.parent.parent / "keys")
    keys_file.write_text("bad key with spaces models=\n")
    keyed.proc.send_signal(signal.SIGHUP)
    await wait_for(lambda: log_events(keyed, "config.reload_failed"), 10, "refused")
    assert (await call(http, keyed, "GET", "/api/tags", ALICE))[0] == 200


async def test_a_config_that_is_not_utf8_fails_the_reload_cleanly(
        daemons: Callable[..., Daemon], http: aiohttp.ClientSession, tmp_path: Path) -> None:  # noqa: F811
    sock_path = tmp_path / "notify.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(sock_path))
    listener.settimeout(10)
    try:
        d = daemons({"a": fake_model()}, env={"NOTIFY_SOCKET": str(sock_path)})
        assert listener.recv(4096).startswith(b"READY=1")
        d.config_path.write_bytes(b"models:\n  a: {model: \xff\xfe}\n")
        d.proc.send_signal(signal.SIGHUP)
        got = [listener.recv(4096).split(b"\n")[0], listener.recv(4096).split(b"\n")[0]]
        assert got == [b"RELOADING=1", b"READY=1"]
        [failed] = log_events(d, "config.reload_failed")
        assert "UTF-8" in failed["error"]
        assert "Task exception was never retrieved" not in d.log()
        async with http.get(d.base_url + "/api/tags") as r:
            assert r.status == 200
    finally:
        listener.close()


# ---------------------------------------------------------------- findings 5, 6, 7, 10


HOSTILE = [
    ("/api/chat", b'{"model": "a", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
    ("/api/chat", b'{"model": "a", "messages": [{"role": "user", "content": "x"}], '
                  b'"options": {"temperature": NaN}}'),
    ("/v1/chat/completions", b'{"model": "a", "messages": [{"role": "user", '
                             b'"content": "x"}], "temperature": Infinity}'),
    ("/v1/chat/completions", b'{"model": "a", "messages": [{"role": "user", '
                             b'"content": "\\ud800"}]}'),
    ("/api/generate", b'{"model": "a", "prompt": "x", "options": {"num_ctx": 1'
                      + b"0" * 400 + b"}}"),
    ("/api/generate", b'{"model": "a", "prompt": "x", "options": {"temperature": 1e400}}'),
]


async def test_hostile_json_is_a_400_in_the_routes_dialect(daemons: Callable[..., Daemon],  # noqa: F811
                                                           http: aiohttp.ClientSession) -> None:  # noqa: F811
    d = daemons({"a": fake_model()})
    for path, raw in HOSTILE:
        async with http.post(d.base_url + path, data=raw,
                             headers={"Content-Type": "application/json"}) as r:
            body = await r.json()
            assert r.status == 400, (path, raw[:80], r.status, body)
            if path.startswith("/v1/"):
                assert body["error"]["type"] == "invalid_request_error"
            else:
                assert isinstance(body["error"], str)
    async with http.get(d.base_url + "/api/ps") as r:
        assert r.status == 200 and (await r.json())["models"] == []  # nothing reached an engine


@pytest.mark.engine
async def test_bad_load_options_never_unload_the_good_engine(daemons: Callable[..., Daemon],  # noqa: F811
                                                             http: aiohttp.ClientSession) -> None:  # noqa: F811
    """Findings 6 and 7: a context that can never fit is a 507 and a layer count no model has
    is a 400, both decided before the loaded engine is touched; nobody else sees 503."""
    d = daemons({"smol": real_model()}, timeouts=REAL_TIMEOUTS,
                memory={"ram_budget": "4GiB", "gpus": []})
    chat = {"model": "smol", "messages": [{"role": "user", "content": "hi"}], "stream": False,
            "options": {"num_predict": 2}}
    async with http.post(d.base_url + "/api/chat", json=chat) as r:
        assert r.status == 200
    pid = await pid_of(http, d, "smol")
    for options, status in (({"num_ctx": 10_000_000}, 507), ({"num_gpu": 10**12}, 400)):
        for _ in range(3):
            async with http.post(d.base_url + "/api/chat",
                                 json={**chat, "options": {**chat["options"], **options}}) as r:
                assert r.status == status, await r.text()
        assert await pid_of(http, d, "smol") == pid
    async with http.post(d.base_url + "/api/chat", json=chat) as r:
        assert r.status == 200
    assert not log_events(d, "worker.failure")


async def test_a_huge_keep_alive_means_forever(daemons: Callable[..., Daemon],  # noqa: F811
                                               http: aiohttp.ClientSession) -> None:  # noqa: F811
    d = daemons({"a": fake_model(), "b": fake_model()})
    for model, keep in (("a", 1e12), ("b", "99999999h")):
        async with http.post(d.base_url + "/api/generate",
                             json={"model": model, "keep_alive": keep}) as r:
            assert r.status == 200
    async with http.get(d.base_url + "/api/ps") as r:
        assert r.status == 200
        assert {m["expires_at"][:4] for m in (await r.json())["models"]} == {"2318"}


# ---------------------------------------------------------------- findings 9, 11, 14


@pytest.mark.engine
async def test_keep_alive_zero_on_a_busy_model_lets_its_stream_finish(
        daemons: Callable[..., Daemon], http: aiohttp.ClientSession) -> None:  # noqa: F811
    d = daemons({"a": fake_model("--tokens", "30", "--token-delay", "0.05", parallel=2)},
                memory={"ram_budget": "90%", "gpus": []})
    chat = {"model": "a", "messages": [{"role": "user", "content": "x"}]}
    async with http.post(d.base_url + "/api/chat", json=chat) as stream:
        first = await stream.content.readline()
        assert first
        async with http.post(d.base_url + "/api/generate",
                             json={"model": "a", "keep_alive": 0}) as r:
            assert r.status == 200
        assert len((await ps(http, d))["models"]) == 1
        async with http.post(d.base_url + "/api/chat", json={**chat, "stream": False}) as r:
            assert r.status == 200  # the same engine served it: no second one loaded
        assert len((await ps(http, d))["models"]) == 1
        lines = [first] + [line async for line in stream.content if line.strip()]
    last = json.loads(lines[-1])
    assert last.get("done") is True and "error" not in last
    await wait_for(lambda: ps(http, d), 1, "ps")
    await wait_for(lambda: _empty(http, d), 10, "unloaded once idle")


async def _empty(http: aiohttp.ClientSession, d: Daemon) -> bool:
    return not (await ps(http, d))["models"]


@pytest.mark.engine
async def test_request_idle_does_not_cut_a_long_non_streamed_answer(
        daemons: Callable[..., Daemon], http: aiohttp.ClientSession) -> None:  # noqa: F811
    """Finding 11: the engine sends nothing until a non-streamed answer is done; silence is
    not a hang there (the prober's /health is the liveness signal)."""
    d = daemons({"smol": real_model()},
                timeouts={**REAL_TIMEOUTS, "request_idle": "1s", "probe_interval": "1s",
                          "probe_timeout": "5s"})
    body = {"model": "smol", "prompt": "Count:", "n_predict": 160, "ignore_eos": True,
            "stream": False}
    async with http.post(d.base_url + "/completion", json=body) as r:
        answer = await r.json()
        assert r.status == 200, answer
    # 160 tokens at one thread took longer than the 1 s of silence that used to fail it
    assert answer["tokens_predicted"] == 160 and answer["timings"]["predicted_ms"] > 1000
    assert not log_events(d, "worker.hung")


@pytest.mark.engine
async def test_a_model_deleted_while_loaded_is_unloaded(daemons: Callable[..., Daemon],  # noqa: F811
                                                        http: aiohttp.ClientSession,  # noqa: F811
                                                        model_path: Path) -> None:
    """Finding 14: with keep_alive -1 the deleted model's engine kept running, booked, its
    blob mapped; now it stops once idle and the blob's disk is freed."""
    import hashlib

    d = daemons({}, timeouts=REAL_TIMEOUTS)
    data = model_path.read_bytes()
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    async with http.post(d.base_url + f"/api/blobs/{digest}", data=data) as r:
        assert r.status in (200, 201)
    async with http.post(d.base_url + "/api/create",
                         json={"model": "victim", "files": {"m.gguf": digest},
                               "stream": False}) as r:
        assert r.status == 200, await r.text()
    async with http.post(d.base_url + "/api/generate",
                         json={"model": "victim", "keep_alive": -1}) as r:
        assert r.status == 200, await r.text()
    pid = await pid_of(http, d, "victim:latest")
    async with http.delete(d.base_url + "/api/delete", json={"model": "victim"}) as r:
        assert r.status == 200
    await wait_for(lambda: _empty(http, d), 30, "the deleted model unloaded")
    await wait_for(lambda: pid_gone(pid), 10, "its engine exited")
    blob = Path(d.workdir / "models" / "blobs" / digest.replace(":", "-"))
    assert not blob.exists()


async def test_a_client_dribbling_headers_is_cut_at_client_idle(
        daemons: Callable[..., Daemon]) -> None:  # noqa: F811
    """An fd held for about an hour by a client that never finishes its headers (aiohttp's
    default keep-alive timeout of 3630 s) is closed at timeouts.client_idle."""
    d = daemons({"a": fake_model()}, timeouts={"client_idle": "1s"})

    def dribble() -> bytes:
        with socket.create_connection(("127.0.0.1", d.port), timeout=15) as s:
            s.sendall(b"POST /api/chat HTTP/1.1\r\nHost: localhost\r\n")
            try:
                for _ in range(30):  # a header line every 0.2 s, never the blank line
                    s.sendall(b"X-Slow: 1\r\n")
                    s.settimeout(0.2)
                    try:
                        data = s.recv(1024)
                    except TimeoutError:
                        continue
                    return data  # b"" once the server closed it
            except (BrokenPipeError, ConnectionResetError):
                return b""
            return b"still open"

    assert await asyncio.to_thread(dribble) == b""
    async with aiohttp.ClientSession() as s, s.get(d.base_url + "/") as r:
        assert r.status == 200


def test_the_body_reader_refuses_what_no_engine_parses() -> None:
    from routerd.bodies import parse_object
    from routerd.errors import BadRequest

    for raw in (b'{"max_tokens": 1' + b"0" * 400 + b"}", b'{"t": 1e400}', b'{"t": -Infinity}',
                b'{"s": "\\udfff"}', b"[" * 5000 + b"]" * 5000):
        with pytest.raises(BadRequest):
            parse_object(raw)
    assert parse_object(b'{"seed": 18446744073709551615, "t": 0.5}') == {
        "seed": 18446744073709551615, "t": 0.5}


def test_the_cli_sends_routerd_api_key(keyed: Daemon) -> None:
    import subprocess

    routerd = str(Path(sys.executable).parent / "routerd")

    def run(*args: str, key: str | None = None) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if k != "ROUTERD_API_KEY"}
        env["ROUTERD_HOST"] = keyed.base_url
        if key is not None:
            env["ROUTERD_API_KEY"] = key
        return subprocess.run([routerd, *args], capture_output=True, text=True, env=env,
                              timeout=60, stdin=subprocess.DEVNULL)

    refused = run("list")
    assert refused.returncode == 1 and "Error" in refused.stderr
    listed = run("list", key=ADMIN)
    assert listed.returncode == 0 and "NAME" in listed.stdout, listed.stderr
    assert run("ps", key=ADMIN).returncode == 0


async def test_engine_state_routes_are_an_admins_reads_are_anyones(
        keyed: Daemon, http: aiohttp.ClientSession) -> None:  # noqa: F811
    status, _ = await call(http, keyed, "GET", "/slots?model=a", ALICE)
    assert status == 200  # reading the slots: any key allowed the model
    for method, path, body in (("POST", "/slots/0?action=erase&model=a", None),
                               ("POST", "/lora-adapters?model=a", [{"id": 0, "scale": 0}])):
        status, answer = await call(http, keyed, method, path, ALICE, body)
        assert status == 403, (path, answer)  # changes it for everyone: an admin's
        status, answer = await call(http, keyed, method, path, ADMIN, body)
        assert status != 403, (path, answer)  # through to the engine (the fake has neither)
    status, answer = await call(http, keyed, "POST", "/slots/0?action=wipe&model=a", ADMIN)
    assert status == 400 and "action" in answer["error"]["message"]
