"""The model-management routes on a real port, driven by the official ollama client."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import ollama
import pytest
from aiohttp import web

from routerd import keys
from routerd.api.common import error_middleware
from routerd.events import EventBus
from routerd.api.manage import PULLER, add_routes, store_context
from routerd.config import parse_config
from routerd.client.progress import run_cp, run_pull, run_rm
from routerd.units import human_bytes
from routerd.store.store import Store
from tests.fakes.registry import FakeRegistry, sha256_file

pytestmark = pytest.mark.timeout(120)
MODEL = Path(os.environ.get("ROUTERD_TEST_MODEL",
                            Path.home() / ".cache/routerd/models/SmolLM2-135M-Instruct.Q4_1.gguf"))


class CatalogSpy:
    """Stands in for the lead's Catalog: counts refresh() calls."""

    def __init__(self) -> None:
        self.refreshes = 0

    def refresh(self) -> None:
        self.refreshes += 1


@dataclass
class Api:
    url: str
    app: web.Application
    root: Path
    reg: FakeRegistry

    @property
    def catalog(self) -> CatalogSpy:
        return self.app[keys.CATALOG]

    @property
    def store(self) -> Store:
        return self.app[keys.STORE]

    @property
    def client(self) -> ollama.Client:
        return ollama.Client(host=self.url, timeout=60)

    @property
    def name(self) -> str:
        return f"{self.reg.host}/library/smollm2:latest"

    async def call(self, method: str, path: str, body: Any = None,
                   data: bytes | None = None) -> tuple[int, Any]:
        async with aiohttp.ClientSession() as s:
            kw: dict[str, Any] = {"data": data} if data is not None else {"json": body}
            async with s.request(method, self.url + path, **kw) as r:
                text = await r.text()
                is_json = r.content_type == "application/json" and text
                return r.status, (json.loads(text) if is_json else text)


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Api]:
    config = parse_config({"models_dir": str(tmp_path / "models"),
                           "ollama_models_dir": str(tmp_path / "ollama")})
    app = web.Application(middlewares=[error_middleware])
    app[keys.CONFIG] = config
    app[keys.CATALOG] = CatalogSpy()
    app[keys.EVENTS] = EventBus()
    app.cleanup_ctx.append(store_context)
    add_routes(app)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    async with FakeRegistry() as reg:
        reg.add_smollm2(MODEL)
        try:
            yield Api(f"http://127.0.0.1:{runner.addresses[0][1]}", app, tmp_path, reg)
        finally:
            await runner.cleanup()


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


async def test_pull_with_the_official_client(api: Api) -> None:
    events = await asyncio.to_thread(
        lambda: list(api.client.pull(api.name, insecure=True, stream=True)))
    statuses = [e.status for e in events]
    assert statuses[0] == "pulling manifest" and statuses[-1] == "success"
    model = [e for e in events if e.digest == f"sha256:{sha256_file(MODEL)}"]
    assert model and model[-1].completed == model[-1].total == MODEL.stat().st_size
    assert all(e.total and e.status == f"pulling {e.digest[7:19]}" for e in events if e.digest)
    m = api.store.resolve(api.name)
    assert m is not None and m.size > MODEL.stat().st_size
    assert api.catalog.refreshes == 1

    api.reg.reset_counters()
    r = await asyncio.to_thread(lambda: api.client.pull(api.name, insecure=True))  # stream: false
    assert r.status == "success" and api.reg.served_total == 0


async def test_two_clients_pull_at_once_and_fetch_once(api: Api) -> None:
    api.reg.faults.delay = 0.002

    def pull() -> str:
        return list(api.client.pull(api.name, insecure=True, stream=True))[-1].status

    assert await asyncio.gather(asyncio.to_thread(pull), asyncio.to_thread(pull)) == [
        "success", "success"]
    assert api.reg.served[sha256_file(MODEL)] == MODEL.stat().st_size


async def test_digest_mismatch_reaches_the_client(api: Api) -> None:
    want = sha256_file(MODEL)
    api.reg.faults.corrupt.add(want)
    with pytest.raises(ollama.ResponseError) as e:
        await asyncio.to_thread(lambda: list(api.client.pull(api.name, insecure=True, stream=True)))
    assert str(e.value.error).startswith(
        f"digest mismatch, file must be downloaded again: want sha256:{want}, got sha256:")
    assert not [p for p in tree(api.root) if want in p or "manifests/" in p]
    status, body = await api.call("POST", "/api/pull", {"model": api.name, "insecure": True,
                                                        "stream": False})
    assert status == 500 and body["error"].startswith("digest mismatch")


async def test_errors_before_and_inside_the_stream(api: Api) -> None:
    assert await api.call("POST", "/api/pull", {"model": "http://" + api.name}) == (
        400, {"error": "insecure protocol http"})
    status, body = await api.call("POST", "/api/pull", {
        "model": f"{api.reg.host}/library/nothere", "insecure": True, "stream": False})
    assert (status, body) == (404, {"error": "pull model manifest: file does not exist"})
    status, text = await api.call("POST", "/api/pull", {
        "model": f"{api.reg.host}/library/nothere", "insecure": True})
    lines = [json.loads(x) for x in text.splitlines()]
    assert status == 200 and lines == [{"status": "pulling manifest"},
                                       {"error": "pull model manifest: file does not exist"}]


async def test_foreign_token_realm_is_refused(api: Api) -> None:
    api.reg.token, api.reg.realm_host = True, f"localhost:{api.reg.port}"
    with pytest.raises(ollama.ResponseError, match="token realm host 'localhost'"):
        await asyncio.to_thread(lambda: list(api.client.pull(api.name, insecure=True, stream=True)))
    assert api.reg.token_requests == 0


@pytest.mark.parametrize("method, path, body", [
    ("POST", "/api/pull", {"model": "../../../etc/passwd", "insecure": True}),
    ("POST", "/api/pull", {"model": "library/../../x", "insecure": True}),
    ("POST", "/api/pull", {"model": "a/b/c/d/e", "insecure": True}),
    ("DELETE", "/api/delete", {"model": "../../x"}),
    ("POST", "/api/copy", {"source": "x", "destination": "../../../tmp/evil"}),
    ("POST", "/api/create", {"model": "../evil", "from": "x"}),
    ("POST", "/api/create", {"model": "ok", "files": {"m.gguf": "sha256:../../../etc/passwd"}}),
    ("HEAD", "/api/blobs/sha256:..%2F..%2Fetc%2Fpasswd", None),
    ("POST", "/api/blobs/sha256-" + "A" * 64, None),
    ("POST", "/api/blobs/..", None),
])
async def test_names_and_digests_that_climb_out_are_refused(
        api: Api, method: str, path: str, body: Any) -> None:
    before = tree(api.root.parent)
    status, _ = await api.call(method, path, body, data=b"x" if body is None else None)
    assert status in (400, 404 if path.endswith("..") else 400)
    assert tree(api.root.parent) == before


async def test_upload_create_copy_delete(api: Api) -> None:
    c = api.client
    digest = await asyncio.to_thread(c.create_blob, MODEL)
    assert (await api.call("HEAD", f"/api/blobs/{digest}"))[0] == 200
    assert (await api.call("HEAD", "/api/blobs/sha256:" + "0" * 64))[0] == 404
    status, body = await api.call("POST", "/api/blobs/sha256:" + "1" * 64, data=b"not it")
    assert status == 400 and "digest mismatch" in body["error"]
    assert not [p for p in tree(api.root) if "1111111111" in p or "upload" in p]

    events = await asyncio.to_thread(lambda: list(c.create(
        model="mine", files={"SmolLM2.gguf": digest}, system="Be brief.",
        template="{{ .Prompt }}", parameters={"temperature": 0.1, "stop": ["</s>"]},
        stream=True)))
    statuses = [e.status for e in events]
    assert statuses[0] == "parsing GGUF" and statuses[-2:] == ["writing manifest", "success"]
    assert f"using existing layer {digest}" in statuses
    mine = api.store.resolve("mine")
    assert mine is not None and mine.name == "mine:latest"
    assert (mine.system, mine.template) == ("Be brief.", "{{ .Prompt }}")
    assert mine.params == {"temperature": 0.1, "stop": ["</s>"]}
    assert mine.details["family"] == "llama" and mine.details["parameter_size"]

    r = await asyncio.to_thread(lambda: c.create(model="mine2", from_="mine", system="Other.",
                                                 parameters={"top_k": 5}))
    assert r.status == "success"
    mine2 = api.store.resolve("mine2:latest")
    assert mine2 is not None and mine2.gguf_path == mine.gguf_path
    assert mine2.system == "Other." and mine2.params == {"temperature": 0.1, "stop": ["</s>"],
                                                         "top_k": 5}
    await asyncio.to_thread(c.copy, "mine", "team/mine-copy:v1")
    assert api.store.resolve("team/mine-copy:v1") is not None
    assert api.catalog.refreshes == 3  # create, create, copy

    be_brief = api.store.blob_path(hashlib.sha256(b"Be brief.").hexdigest())
    await asyncio.to_thread(c.delete, "mine")
    assert api.store.resolve("mine") is None and be_brief.exists()  # the copy still uses it
    await asyncio.to_thread(c.delete, "team/mine-copy:v1")
    assert not be_brief.exists() and mine.gguf_path.exists()  # mine2 still uses the GGUF
    await asyncio.to_thread(c.delete, "mine2")
    assert not mine.gguf_path.exists()
    assert not (api.root / "models/manifests").exists() or not any(
        (api.root / "models/manifests").rglob("*"))
    with pytest.raises(ollama.ResponseError) as e:
        await asyncio.to_thread(c.delete, "mine2")
    assert e.value.status_code == 404


def make_ollama_store(root: Path) -> tuple[Path, str]:
    """A tiny store in Ollama's own layout, as ~/.ollama/models would hold it."""
    blobs = root / "blobs"
    blobs.mkdir(parents=True)
    layers = []
    for media, data in (("model", b"GGUF-not-really"), ("system", b"Hi from Ollama.")):
        d = hashlib.sha256(data).hexdigest()
        (blobs / f"sha256-{d}").write_bytes(data)
        layers.append({"mediaType": f"application/vnd.ollama.image.{media}",
                       "digest": f"sha256:{d}", "size": len(data)})
    cfg = json.dumps({"model_format": "gguf", "model_family": "llama", "model_families": ["llama"],
                      "model_type": "135M", "file_type": "Q4_1"}).encode()
    cd = hashlib.sha256(cfg).hexdigest()
    (blobs / f"sha256-{cd}").write_bytes(cfg)
    manifest = root / "manifests/registry.ollama.ai/library/tiny/latest"
    manifest.parent.mkdir(parents=True)
    manifest.write_text(json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json",
                   "digest": f"sha256:{cd}", "size": len(cfg)}, "layers": layers}))
    return manifest, layers[0]["digest"][7:]


async def test_ollama_store_is_listed_read_only(api: Api) -> None:
    manifest, model_blob = make_ollama_store(api.root / "ollama")
    before = {p: p.stat().st_mtime_ns for p in (api.root / "ollama").rglob("*")}
    [tiny] = [m for m in api.store.list_models() if m.name == "tiny:latest"]
    assert tiny.readonly and tiny.system == "Hi from Ollama."
    assert tiny.details["parameter_size"] == "135M"
    assert api.store.resolve("tiny") == tiny
    status, body = await api.call("DELETE", "/api/delete", {"model": "tiny"})
    assert status == 403 and "read-only" in body["error"]
    assert {p: p.stat().st_mtime_ns for p in (api.root / "ollama").rglob("*")} == before

    await asyncio.to_thread(api.client.copy, "tiny", "tiny-mine")
    mine = api.store.resolve("tiny-mine")
    assert mine is not None and not mine.readonly
    assert mine.gguf_path == api.store.blob_path(model_blob) and mine.gguf_path.exists()
    await asyncio.to_thread(api.client.delete, "tiny-mine")
    assert manifest.exists() and (api.root / f"ollama/blobs/sha256-{model_blob}").exists()


def test_puller_key_and_human_bytes() -> None:
    assert PULLER.__class__.__name__ == "AppKey"
    assert [human_bytes(n) for n in (0, 999, 1500, 98362432, 4.7e9, 12e12)] == [
        "0 B", "999 B", "1.5 KB", "98 MB", "4.7 GB", "12 TB"]


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


async def test_cli_pull_rm_cp(api: Api) -> None:
    plain = io.StringIO()
    assert await run_pull(api.url, api.name, True, out=plain) == 0
    lines = plain.getvalue().splitlines()
    short = sha256_file(MODEL)[:12]
    assert lines[0] == "pulling manifest" and lines[-1] == "success"
    assert f"pulling {short} 100% 98 MB/98 MB" in lines
    assert "verifying sha256 digest" in lines and "writing manifest" in lines

    tty = _Tty()
    assert await run_pull(api.url, api.name, True, out=tty) == 0
    assert "\x1b[2K" in tty.getvalue() and "█" * 25 in tty.getvalue()

    bad = io.StringIO()
    assert await run_pull(api.url, "../x", True, out=bad) == 1
    assert bad.getvalue().startswith("Error: invalid model name")
    out, err = io.StringIO(), io.StringIO()
    assert await run_cp(api.url, api.name, "smol2", out=out, err=err) == 0
    assert out.getvalue() == f"copied '{api.name}' to 'smol2'\n"
    assert await run_rm(api.url, "smol2", out=out, err=err) == 0
    assert await run_rm(api.url, "smol2", out=out, err=err) == 1
    assert err.getvalue() == "Error: model 'smol2' not found\n"
    assert await run_rm("http://127.0.0.1:9", "x", out=out, err=err) == 1
    assert "could not connect to routerd" in err.getvalue()


async def test_client_disconnect_cancels_and_next_pull_resumes(api: Api) -> None:
    api.reg.faults.delay = 0.004
    digest, size = sha256_file(MODEL), MODEL.stat().st_size
    puller = api.app[PULLER]
    async with aiohttp.ClientSession() as s:
        async with s.post(api.url + "/api/pull", json={"model": api.name, "insecure": True}) as r:
            async for line in r.content:
                if json.loads(line).get("completed", 0) > 5_000_000:
                    break
            tasks = [f.task for f in puller._flights.values()]
            r.close()  # the client goes away mid-download
    await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 20)
    assert all(t.cancelled() for t in tasks)
    sidecar = api.store.blobs_dir / f"sha256-{digest}-partial.json"
    persisted = sum(c for _, _, c in json.loads(sidecar.read_text())["parts"])
    assert not api.store.blob_path(digest).exists() and persisted > 0

    api.reg.faults.delay = 0
    api.reg.reset_counters()
    r2 = await asyncio.to_thread(lambda: api.client.pull(api.name, insecure=True))
    assert r2.status == "success" and api.reg.served[digest] == size - persisted
