"""A fake Ollama registry (Docker registry v2 subset) for pull tests, on loopback.

Serves manifests and blobs (HEAD, GET, Range) for models added with ``add_model`` /
``add_smollm2`` (the real SmolLM2 GGUF as the model layer, plus params, system,
template and license layers and a config blob), with knobs for faults:

* ``token=True``: every /v2 request needs ``Authorization: Bearer <token>``; a 401
  carries ``WWW-Authenticate: Bearer realm=…,service=…,scope=…`` whose realm is on this
  server, or on ``realm_host`` when given (to test that a foreign realm is refused).
* ``faults.cut_after = N``: once N blob bytes were served in total, every blob
  connection open at that moment is cut; ``faults.refuse_after_cut`` then answers 503
  to blob requests until ``faults.reset()``.
* ``faults.stall_after = N``: the first connection to pass N bytes stops sending and
  keeps the connection open (the client must time out and retry).
* ``faults.corrupt``: hex digests whose bytes are served with one byte changed.
* ``served``/``served_total`` count the blob bytes written; ``token_requests`` counts
  token fetches; ``requests`` logs (method, path, Range).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

MANIFEST_V2 = "application/vnd.docker.distribution.manifest.v2+json"
CONFIG_V1 = "application/vnd.docker.container.image.v1+json"
OLLAMA = "application/vnd.ollama.image."
TOKEN = "fake-token-3f9a"
SMOLLM2_TEMPLATE = (
    "{{- if .Messages }}{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n"
    "{{ end }}<|im_start|>assistant\n{{ else }}{{ if .System }}<|im_start|>system\n{{ .System }}"
    "<|im_end|>\n{{ end }}{{ if .Prompt }}<|im_start|>user\n{{ .Prompt }}<|im_end|>\n{{ end }}"
    "<|im_start|>assistant\n{{ end }}{{ .Response }}{{ if .Response }}<|im_end|>{{ end }}"
)
_DIGEST = re.compile(r"^sha256:([0-9a-f]{64})$")
_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")
_HASHES: dict[tuple[str, int, int], str] = {}


def sha256_file(path: Path) -> str:
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(4 << 20):
                h.update(chunk)
        _HASHES[key] = h.hexdigest()
    return _HASHES[key]


@dataclass
class Blob:
    digest: str
    size: int
    path: Path | None = None
    data: bytes | None = None

    def read(self, pos: int, n: int) -> bytes:
        if self.data is not None:
            return self.data[pos:pos + n]
        assert self.path is not None
        with open(self.path, "rb") as f:
            f.seek(pos)
            return f.read(n)


@dataclass
class Faults:
    cut_after: int | None = None
    refuse_after_cut: bool = False
    stall_after: int | None = None
    corrupt: set[str] = field(default_factory=set)
    delay: float = 0.0  # seconds to sleep per chunk sent (slows a download down)
    cut_done: bool = False
    stall_done: bool = False

    def reset(self) -> None:
        self.cut_after, self.refuse_after_cut, self.stall_after = None, False, None
        self.corrupt.clear()
        self.delay = 0.0
        self.cut_done = self.stall_done = False


class FakeRegistry:
    def __init__(self, *, token: bool = False, realm_host: str | None = None,
                 chunk_size: int = 256 * 1024) -> None:
        self.token = token
        self.realm_host = realm_host
        self.chunk_size = chunk_size
        self.blobs: dict[str, Blob] = {}
        self.manifests: dict[tuple[str, str, str], bytes] = {}
        self.files: dict[str, Blob] = {}
        self.faults = Faults()
        self.served: Counter[str] = Counter()
        self.served_total = 0
        self.token_requests = 0
        self.requests: list[tuple[str, str, str]] = []
        self._cut_epoch = 0
        self._unstall = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.port = 0

    # ---------------------------------------------------------------- content

    def add_blob_bytes(self, data: bytes) -> Blob:
        b = Blob(hashlib.sha256(data).hexdigest(), len(data), data=data)
        self.blobs[b.digest] = b
        return b

    def add_blob_file(self, path: Path) -> Blob:
        b = Blob(sha256_file(path), path.stat().st_size, path=path)
        self.blobs[b.digest] = b
        return b

    def add_model(self, namespace: str, model: str, tag: str,
                  layers: list[tuple[str, Blob]], config: Blob) -> bytes:
        doc = {
            "schemaVersion": 2, "mediaType": MANIFEST_V2,
            "config": {"mediaType": CONFIG_V1, "digest": f"sha256:{config.digest}",
                       "size": config.size},
            "layers": [{"mediaType": mt, "digest": f"sha256:{b.digest}", "size": b.size}
                       for mt, b in layers],
        }
        data = json.dumps(doc).encode()
        self.manifests[(namespace, model, tag)] = data
        self.manifests[(namespace, model, f"sha256:{hashlib.sha256(data).hexdigest()}")] = data
        return data

    def add_file(self, name: str, blob: Blob) -> str:
        """Serve ``blob`` at ``/files/<name>`` (with ETag and Range): a direct download URL."""
        self.files[name] = blob
        return f"http://{self.host}/files/{name}"

    def add_raw_manifest(self, namespace: str, model: str, tag: str, data: bytes) -> None:
        self.manifests[(namespace, model, tag)] = data

    def add_smollm2(self, gguf: Path, namespace: str = "library", model: str = "smollm2",
                    tag: str = "latest", system: str = "You are a helpful assistant.",
                    params: dict[str, Any] | None = None) -> dict[str, Blob]:
        params = params if params is not None else {
            "stop": ["<|im_start|>", "<|im_end|>"], "temperature": 0.2}
        layers = {
            "model": self.add_blob_file(gguf),
            "template": self.add_blob_bytes(SMOLLM2_TEMPLATE.encode()),
            "system": self.add_blob_bytes(system.encode()),
            "params": self.add_blob_bytes(json.dumps(params).encode()),
            "license": self.add_blob_bytes(b"Apache License 2.0 (test copy)"),
        }
        config = self.add_blob_bytes(json.dumps({
            "model_format": "gguf", "model_family": "llama", "model_families": ["llama"],
            "model_type": "134.52M", "file_type": "Q4_1", "architecture": "amd64", "os": "linux",
            "rootfs": {"type": "layers",
                       "diff_ids": [f"sha256:{b.digest}" for b in layers.values()]},
        }).encode())
        self.add_model(namespace, model, tag,
                       [(OLLAMA + kind, b) for kind, b in layers.items()], config)
        return {**layers, "config": config}

    # ---------------------------------------------------------------- server

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> FakeRegistry:
        app = web.Application()
        app.router.add_get("/v2/{ns}/{model}/manifests/{ref}", self._manifest)
        app.router.add_route("*", "/v2/{ns}/{model}/blobs/{digest}", self._blob)
        app.router.add_get("/token", self._token)
        app.router.add_route("*", "/files/{name}", self._file)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def close(self) -> None:
        self._unstall.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeRegistry:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def reset_counters(self) -> None:
        self.served.clear()
        self.served_total = 0
        self.requests.clear()
        self.token_requests = 0

    # ---------------------------------------------------------------- handlers

    def _unauthorized(self, request: web.Request) -> web.Response | None:
        if not self.token or request.headers.get("Authorization") == f"Bearer {TOKEN}":
            return None
        ns, model = request.match_info["ns"], request.match_info["model"]
        realm = f"http://{self.realm_host or self.host}/token"
        return web.json_response(
            {"errors": [{"code": "UNAUTHORIZED"}]}, status=401,
            headers={"WWW-Authenticate": f'Bearer realm="{realm}",service="fake-registry",'
                                         f'scope="repository:{ns}/{model}:pull"'})

    async def _token(self, request: web.Request) -> web.Response:
        self.token_requests += 1
        return web.json_response({"token": TOKEN})

    async def _manifest(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(("GET", request.path, ""))
        if (denied := self._unauthorized(request)) is not None:
            return denied
        key = (request.match_info["ns"], request.match_info["model"], request.match_info["ref"])
        data = self.manifests.get(key)
        if data is None:
            return web.json_response({"errors": [{"code": "MANIFEST_UNKNOWN"}]}, status=404)
        return web.Response(body=data, content_type=MANIFEST_V2)

    async def _blob(self, request: web.Request) -> web.StreamResponse:
        rng = request.headers.get("Range", "")
        self.requests.append((request.method, request.path, rng))
        if (denied := self._unauthorized(request)) is not None:
            return denied
        m = _DIGEST.match(request.match_info["digest"])
        blob = self.blobs.get(m.group(1)) if m else None
        return await self._serve(request, blob)

    async def _file(self, request: web.Request) -> web.StreamResponse:
        self.requests.append((request.method, request.path, request.headers.get("Range", "")))
        return await self._serve(request, self.files.get(request.match_info["name"]),
                                 {"ETag": '"v1"'})

    async def _serve(self, request: web.Request, blob: Blob | None,
                     extra: dict[str, str] | None = None) -> web.StreamResponse:
        rng = request.headers.get("Range", "")
        if blob is None:
            return web.json_response({"errors": [{"code": "BLOB_UNKNOWN"}]}, status=404)
        if request.method == "HEAD":
            return web.Response(headers={"Content-Length": str(blob.size),
                                         "Accept-Ranges": "bytes", **(extra or {})})
        if request.method != "GET":
            return web.Response(status=405)
        if self.faults.refuse_after_cut and self.faults.cut_done:
            return web.Response(status=503, text="registry unavailable (fault)")
        start, end, status = 0, blob.size, 200
        if (rm := _RANGE.match(rng)) is not None:
            start = int(rm.group(1))
            end = min(blob.size, int(rm.group(2)) + 1) if rm.group(2) else blob.size
            if start >= end:
                return web.Response(status=416)
            status = 206
        resp = web.StreamResponse(status=status)
        resp.content_length = end - start
        resp.headers["Accept-Ranges"] = "bytes"
        resp.headers.update(extra or {})
        if status == 206:
            resp.headers["Content-Range"] = f"bytes {start}-{end - 1}/{blob.size}"
        await resp.prepare(request)
        await self._send(request, resp, blob, start, end)
        return resp

    async def _send(self, request: web.Request, resp: web.StreamResponse, blob: Blob,
                    start: int, end: int) -> None:
        epoch, mine, pos = self._cut_epoch, 0, start
        f = self.faults
        while pos < end:
            chunk = blob.read(pos, min(self.chunk_size, end - pos))
            if blob.digest in f.corrupt and pos <= blob.size // 2 < pos + len(chunk):
                i = blob.size // 2 - pos
                chunk = chunk[:i] + bytes([chunk[i] ^ 0xFF]) + chunk[i + 1:]
            if f.cut_after is not None and (self._cut_epoch != epoch or not f.cut_done):
                room = f.cut_after - self.served_total
                if self._cut_epoch != epoch or room < len(chunk):
                    if self._cut_epoch == epoch and room > 0:
                        await self._count_write(resp, blob, chunk[:room])
                    if not f.cut_done:
                        f.cut_done, self._cut_epoch = True, self._cut_epoch + 1
                    self._abort(request)
                    return
            if f.stall_after is not None and not f.stall_done and mine + len(chunk) > f.stall_after:
                f.stall_done = True
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._unstall.wait(), 60)
                self._abort(request)
                return
            await self._count_write(resp, blob, chunk)
            if f.delay:
                await asyncio.sleep(f.delay)
            pos += len(chunk)
            mine += len(chunk)
        await resp.write_eof()

    async def _count_write(self, resp: web.StreamResponse, blob: Blob, data: bytes) -> None:
        self.served[blob.digest] += len(data)  # counted before the await: the cut is exact
        self.served_total += len(data)
        await resp.write(data)

    @staticmethod
    def _abort(request: web.Request) -> None:
        if request.transport is not None:
            request.transport.abort()
