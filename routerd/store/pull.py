"""Pull models the way Ollama does: registry manifests, verified blobs, progress events.

``Puller.pull(name)`` yields Ollama's progress objects::

    {"status": "pulling manifest"}
    {"status": "pulling 4c2f0d3a1b2e", "digest": "sha256:…", "total": N, "completed": n}
    {"status": "verifying sha256 digest"} {"status": "writing manifest"}
    {"status": "removing unused layers"}  (only when the tag moved) {"status": "success"}

and raises a RouterdError on failure (the HTTP layer turns it into ``{"error": …}``).

* Registry names (``registry.ollama.ai``, any ``host[:port]``, ``hf.co``/``huggingface.co``)
  use ``/v2/<ns>/<model>/manifests/<tag>`` and ``/v2/<ns>/<model>/blobs/<digest>``.
  Anonymous bearer tokens are fetched on a 401, only from a realm on the registry's own
  host (or its known alias: hf.co ↔ huggingface.co), see CVE-2025-51471.
* Plain http only with ``insecure`` (per request) or ``registries.insecure``; the host
  must be in ``registries.allow`` when that is set.
* A direct ``https://…/file.gguf`` URL downloads one blob (digest computed, resumable
  when the server honours Range) and stores it as ``<host>/url/<stem>:latest``.
* Each blob is downloaded once however many pulls want it: a per-digest task owned by
  the Puller.  A client that leaves stops watching; the last one to leave cancels the
  download (its partial file and sidecar stay, so the next pull resumes).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence

import aiohttp
import structlog
from yarl import URL

from ..errors import BadRequest, Forbidden, ModelNotFound
from .blobs import (BlobDownload, DigestMismatch, DownloadError, DownloadPolicy, RetryableError,
                    describe)
from .gguf import details
from .manifests import (CONFIG_V1, MANIFEST_V2, MAX_MANIFEST, MODEL, Layer, ManifestError,
                        build_config, build_manifest, parse_manifest)
from .names import (HOST_ALIASES, ModelName, blob_filename, is_url, parse_digest, parse_name,
                    url_model_name)
from .store import Store

log = structlog.get_logger(__name__)

USER_AGENT = "routerd/0.1 (ollama-compatible)"
_CHALLENGE_RE = re.compile(r'(\w+)="([^"]*)"')


@dataclass(frozen=True)
class Target:
    name: ModelName
    base: URL  # scheme://host[:port] of the registry, or the file URL for a direct download
    insecure: bool
    direct: bool = False


@dataclass
class _Flight:
    task: asyncio.Task[str]
    total: int
    download: BlobDownload | None = None
    waiters: int = 0
    abandoned: bool = False

    @property
    def completed(self) -> int:
        return self.download.completed if self.download else 0


def progress(status: str, digest: str = "", total: int = 0, completed: int = 0) -> dict[str, Any]:
    """Ollama's ProgressResponse; empty fields are left out (Go's omitempty)."""
    out: dict[str, Any] = {"status": status}
    if digest:
        out["digest"] = digest
    if total:
        out["total"] = total
    if completed:
        out["completed"] = completed
    return out


class Puller:
    def __init__(self, store: Store,
                 session_factory: Callable[[], aiohttp.ClientSession] | None = None, *,
                 allow_hosts: Sequence[str] | None = None, insecure_default: bool = False,
                 policy: DownloadPolicy | None = None, stall_timeout: float = 30.0,
                 progress_interval: float = 0.1) -> None:
        self.store = store
        self._session_factory = session_factory or self._default_session
        self._session: aiohttp.ClientSession | None = None
        self.allow_hosts = None if allow_hosts is None else {h.lower() for h in allow_hosts}
        self.insecure_default = insecure_default
        self.policy = policy or DownloadPolicy()
        self.stall_timeout = stall_timeout
        self.progress_interval = progress_interval
        self._flights: dict[str, _Flight] = {}
        self._tokens: dict[tuple[str, str], str] = {}

    @staticmethod
    def _default_session() -> aiohttp.ClientSession:
        return aiohttp.ClientSession(headers={"User-Agent": USER_AGENT}, trust_env=True)

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = self._session_factory()
        return self._session

    async def aclose(self) -> None:
        """Cancel running downloads (their partials stay resumable) and close the session."""
        tasks = [f.task for f in self._flights.values()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None

    # ---------------------------------------------------------------- validation

    def check(self, name: str, insecure: bool = False) -> Target:
        """Validate a pull request before anything is fetched or written."""
        insecure = insecure or self.insecure_default
        if is_url(name):
            mn = url_model_name(name)
            base = URL(name.strip())
            self._check_host(mn.host, base.scheme, insecure)
            return Target(mn, base, insecure, direct=True)
        mn = parse_name(name)
        explicit = "://" in name
        scheme = mn.scheme if explicit else ("http" if insecure else "https")
        self._check_host(mn.host, scheme, insecure)
        return Target(mn, URL.build(scheme=scheme, authority=mn.host), insecure)

    def _check_host(self, host: str, scheme: str, insecure: bool) -> None:
        if scheme == "http" and not insecure:
            raise BadRequest("insecure protocol http")
        if self.allow_hosts is not None:
            hostname = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
            if host.lower() not in self.allow_hosts and hostname.lower() not in self.allow_hosts:
                raise Forbidden(f"registry {host} is not in registries.allow")

    # ---------------------------------------------------------------- the pull

    async def pull(self, name: str, *, insecure: bool = False) -> AsyncIterator[dict[str, Any]]:
        target = self.check(name, insecure)
        log.info("pull.started", model=target.name.full, direct=target.direct)
        pull = self._pull_url(target) if target.direct else self._pull_registry(target)
        async with contextlib.aclosing(pull) as events:
            async for event in events:
                yield event
        log.info("pull.finished", model=target.name.full)

    async def _pull_registry(self, target: Target) -> AsyncGenerator[dict[str, Any], None]:
        yield progress("pulling manifest")
        data = await self._fetch_manifest(target)
        manifest = parse_manifest(data)
        with self.store.pinned(manifest.digests()):
            mismatches: list[DigestMismatch] = []
            for layer in manifest.all_layers():
                try:
                    async with contextlib.aclosing(self._pull_layer(target, layer)) as events:
                        async for event in events:
                            yield event
                except DigestMismatch as e:
                    mismatches.append(e)
            yield progress("verifying sha256 digest")
            if mismatches:
                raise mismatches[0]
            async for event in self._commit(target.name, data, manifest.digests()):
                yield event

    async def _commit(self, name: ModelName, data: bytes,
                      keep: set[str]) -> AsyncGenerator[dict[str, Any], None]:
        old = self.store.read_manifest(name)
        unused: set[str] = set()
        if old is not None:
            with contextlib.suppress(ManifestError):
                unused = parse_manifest(old[1]).digests() - keep
        yield progress("writing manifest")
        await asyncio.to_thread(self.store.write_manifest, name, data)
        if unused:  # the tag moved: drop what no manifest uses any more
            yield progress("removing unused layers")
            await asyncio.to_thread(self.store.collect, unused)
        yield progress("success")

    async def _pull_layer(self, target: Target,
                          layer: Layer) -> AsyncGenerator[dict[str, Any], None]:
        status = f"pulling {layer.digest[:12]}"
        have = self.store.blob_path(layer.digest)
        if await asyncio.to_thread(self._have, layer):
            yield progress(status, layer.ref, layer.size, layer.size)
            return
        url = target.base.with_path(f"/v2/{target.name.repository}/blobs/{layer.ref}")
        scope = self._scope(target)

        async def download(flight: _Flight) -> str:
            await self._probe_blob(url, scope, layer, target.insecure)
            source = HttpSource(self, url, scope, target.insecure, ranges=True)
            flight.download = BlobDownload(
                have.with_name(have.name + "-partial"), layer.size, source, self.policy,
                key=layer.ref, want=layer.digest, final_for=self.store.blob_path)
            return await flight.download.run()

        flight = self._flight(layer.ref, layer.size, download)
        async with contextlib.aclosing(self._watch(flight, status, layer.ref)) as events:
            async for event in events:
                yield event

    def _have(self, layer: Layer) -> bool:
        path = self.store.blob_path(layer.digest)
        if not path.is_file():
            self.store.adopt_blob(layer.digest)
        try:
            return path.stat().st_size == layer.size
        except OSError:
            return False

    # ---------------------------------------------------------------- shared downloads

    def _flight(self, key: str, total: int,
                run: Callable[[_Flight], Awaitable[str]]) -> _Flight:
        prev = self._flights.get(key)
        if prev is not None and not prev.abandoned and not prev.task.done():
            return prev

        async def body(flight: _Flight) -> str:
            if prev is not None and not prev.task.done():  # let a cancelled one let go first
                await asyncio.wait({prev.task})
            return await run(flight)

        flight = _Flight(task=None, total=total)  # type: ignore[arg-type]
        flight.task = asyncio.create_task(body(flight), name=f"pull:{key}")
        self._flights[key] = flight

        def done(t: asyncio.Task[str]) -> None:
            if self._flights.get(key) is flight:
                del self._flights[key]
            if not t.cancelled():
                t.exception()  # retrieved here: waiters re-raise it themselves

        flight.task.add_done_callback(done)
        return flight

    async def _watch(self, flight: _Flight, status: str,
                     digest: str) -> AsyncGenerator[dict[str, Any], None]:
        flight.waiters += 1
        try:
            while True:
                done, _ = await asyncio.wait({flight.task}, timeout=self.progress_interval)
                if done and (flight.task.cancelled() or flight.task.exception()):
                    break
                yield progress(status, digest, flight.total, flight.completed)
                if done:
                    break
            if flight.task.cancelled():
                raise DownloadError("download cancelled (routerd is stopping)")
            flight.task.result()
        finally:
            flight.waiters -= 1
            if flight.waiters == 0 and not flight.task.done():
                flight.abandoned = True
                flight.task.cancel()

    # ---------------------------------------------------------------- direct URLs

    async def _pull_url(self, target: Target) -> AsyncGenerator[dict[str, Any], None]:
        url = target.base
        filename = Path(url.path).name
        status = f"pulling {filename}"
        yield progress(status)
        total, ranges, validator = await self._probe_url(url, target.insecure)
        source_info = {"url": str(url), "size": total, "validator": validator}
        existing = self.store.resolve(target.name.full)
        cfg = (existing.manifest.get("config") or {}) if existing else {}
        if existing and self._same_source(existing.root, cfg, source_info):
            yield progress(status, "", total, total)
            yield progress("success")
            return
        key = "url:" + str(url)
        partial = self.store.blobs_dir / f"url-{hashlib.sha256(key.encode()).hexdigest()}-partial"

        async def download(flight: _Flight) -> str:
            source = HttpSource(self, url, None, target.insecure, ranges=ranges)
            flight.download = BlobDownload(partial, total, source, self.policy, key=key,
                                           want=None, final_for=self.store.blob_path,
                                           validator=validator, resumable=validator is not None)
            return await flight.download.run()

        flight = self._flight(key, total, download)
        async with contextlib.aclosing(self._watch(flight, status, "")) as events:
            async for event in events:
                yield event
        digest = flight.task.result()
        yield progress("verifying sha256 digest")
        with self.store.pinned([digest]):
            yield progress("parsing GGUF")
            info = await asyncio.to_thread(self.store.gguf_info, self.store.blob_path(digest))
            if info is None:
                await asyncio.to_thread(self.store.collect, [digest])
                raise BadRequest(f"{filename} is not a GGUF model file")
            model = Layer(MODEL, digest, total)
            cfg_bytes = build_config(details(info), [model], {"routerd_source": source_info})
            cfg_digest, _ = await asyncio.to_thread(self.store.add_blob, cfg_bytes)
            config = Layer(CONFIG_V1, cfg_digest, len(cfg_bytes))
            data = build_manifest(config, [model])
            async for event in self._commit(target.name, data, {digest, cfg_digest}):
                yield event

    @staticmethod
    def _same_source(root: Path | None, cfg: dict[str, Any], info: dict[str, Any]) -> bool:
        if root is None or not isinstance(cfg.get("digest"), str):
            return False
        try:
            blob = root / "blobs" / blob_filename(parse_digest(cfg["digest"]))
            stored = json.loads(blob.read_bytes()).get("routerd_source")
        except (OSError, ValueError, AttributeError, BadRequest):
            return False
        return bool(info["validator"]) and stored == info

    async def _probe_url(self, url: URL, insecure: bool) -> tuple[int, bool, str | None]:
        try:
            async with self._request("HEAD", url, None, insecure) as resp:
                if resp.status >= 400:
                    raise DownloadError(f"{url}: HTTP {resp.status}")
                size = resp.content_length
                ranges = "bytes" in resp.headers.get("Accept-Ranges", "").lower()
                etag = resp.headers.get("ETag") or resp.headers.get("Last-Modified")
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            raise DownloadError(f"{url}: {describe(e)}") from None
        if not size:
            raise DownloadError(f"{url}: the server did not say how large the file is")
        return size, ranges, etag

    # ---------------------------------------------------------------- registry HTTP

    @staticmethod
    def _scope(target: Target) -> str:
        return f"repository:{target.name.repository}:pull"

    async def _fetch_manifest(self, target: Target) -> bytes:
        n = target.name
        ref = f"sha256:{n.digest}" if n.digest else n.tag
        url = target.base.with_path(f"/v2/{n.repository}/manifests/{ref}")
        try:
            async with self._request("GET", url, self._scope(target), target.insecure,
                                     headers={"Accept": MANIFEST_V2}) as resp:
                if resp.status == 404:
                    raise ModelNotFound("pull model manifest: file does not exist")
                if resp.status != 200:
                    raise DownloadError(f"pull model manifest: HTTP {resp.status} from {n.host}")
                data = await resp.content.read(MAX_MANIFEST + 1)
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            raise DownloadError(f"pull model manifest: {describe(e)}") from None
        if n.digest and hashlib.sha256(data).hexdigest() != n.digest:
            raise DownloadError("pull model manifest: digest does not match the name")
        return data

    async def _probe_blob(self, url: URL, scope: str, layer: Layer, insecure: bool) -> None:
        try:
            async with self._request("HEAD", url, scope, insecure) as resp:
                if resp.status == 200 and resp.content_length not in (None, layer.size):
                    raise DownloadError(f"blob {layer.ref}: registry says {resp.content_length}"
                                        f" bytes, manifest says {layer.size}")
                if resp.status == 404:
                    raise DownloadError(f"blob {layer.ref}: not found on the registry")
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            raise DownloadError(f"blob {layer.ref}: {describe(e)}") from None

    @contextlib.asynccontextmanager
    async def _request(self, method: str, url: URL, scope: str | None, insecure: bool, *,
                       headers: dict[str, str] | None = None,
                       timeout: aiohttp.ClientTimeout | None = None,
                       ) -> AsyncIterator[aiohttp.ClientResponse]:
        """One request with the anonymous bearer-token dance on 401 (registry only)."""
        timeout = timeout or aiohttp.ClientTimeout(total=None, sock_connect=30,
                                                   sock_read=self.stall_timeout)
        for attempt in (0, 1):
            hdrs = dict(headers or {})
            token = self._tokens.get((url.host or "", scope)) if scope else None
            if token:
                hdrs["Authorization"] = f"Bearer {token}"
            resp = await self.session.request(method, url, headers=hdrs, timeout=timeout,
                                              ssl=not insecure)
            try:
                if resp.url.scheme == "http" and url.scheme == "https" and not insecure:
                    raise DownloadError(f"{url.host}: redirected to plain http")
                if resp.status == 401 and scope and attempt == 0:
                    challenge = resp.headers.get("WWW-Authenticate", "")
                    resp.release()
                    self._tokens[(url.host or "", scope)] = await self._token(
                        url, challenge, scope, insecure)
                    continue
                yield resp
                return
            finally:
                resp.release()
        raise DownloadError(f"{url.host}: unauthorized")  # pragma: no cover

    async def _token(self, url: URL, challenge: str, scope: str, insecure: bool) -> str:
        kind, _, rest = challenge.partition(" ")
        params = dict(_CHALLENGE_RE.findall(rest))
        if kind.lower() != "bearer" or not params.get("realm"):
            raise DownloadError(f"{url.host}: unsupported authentication {kind or 'none'!r}")
        realm = URL(params["realm"])
        if realm.scheme not in ("http", "https") or (realm.scheme == "http" and not insecure):
            raise Forbidden(f"token realm {params['realm']!r} must be https")
        if not _same_host(realm, url):
            raise Forbidden(f"token realm host {realm.host!r} does not match "
                            f"registry host {url.host!r}")
        query = {"service": params.get("service", ""), "scope": params.get("scope", scope)}
        async with self.session.get(realm, params=query, ssl=not insecure,
                                    timeout=aiohttp.ClientTimeout(total=60)) as resp:
            if resp.status != 200:
                raise DownloadError(f"{realm.host}: token request failed: HTTP {resp.status}")
            try:
                body = await resp.json(content_type=None)
            except ValueError:
                raise DownloadError(f"{realm.host}: token response is not JSON") from None
        token = body.get("token") or body.get("access_token") if isinstance(body, dict) else None
        if not isinstance(token, str) or not token:
            raise DownloadError(f"{realm.host}: no token in the token response")
        return token


def _same_host(a: URL, b: URL) -> bool:
    """Same host and port; hf.co and huggingface.co count as one (the Hub's realm)."""
    ha, hb = (a.host or "").lower(), (b.host or "").lower()
    return a.port == b.port and (ha == hb or HOST_ALIASES.get(hb) == ha)


class HttpSource:
    """Range requests for one blob URL through the Puller's session and tokens."""

    def __init__(self, puller: Puller, url: URL, scope: str | None, insecure: bool,
                 *, ranges: bool) -> None:
        self.puller, self.url, self.scope, self.insecure = puller, url, scope, insecure
        self.ranges = ranges

    async def stream(self, start: int, end: int) -> AsyncGenerator[bytes, None]:
        headers = {"Range": f"bytes={start}-{end - 1}"} if self.ranges else {}
        async with self.puller._request("GET", self.url, self.scope, self.insecure,
                                        headers=headers) as resp:
            if resp.status in (408, 429) or resp.status >= 500:
                raise RetryableError(f"HTTP {resp.status}")
            if resp.status == 206:
                got = resp.headers.get("Content-Range", "")
                if not got.startswith(f"bytes {start}-"):
                    raise DownloadError(f"{self.url.host}: wrong Content-Range {got!r}")
            elif resp.status != 200:
                raise DownloadError(f"{self.url.host}: HTTP {resp.status} for {self.url.path}")
            elif self.ranges and start != 0:
                raise DownloadError(f"{self.url.host}: the server ignored the Range header")
            async for chunk in resp.content.iter_any():
                yield chunk

