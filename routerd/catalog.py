"""The catalog: every model routerd can serve, by name and alias.

Sources, in precedence order: models in the config, models pulled into the store (and an
Ollama store read-only), models discovered on disk. A name is owned by the first source that
claims it; later sources never shadow it silently.

A rebuild lists the store and scans the discovery folders (0.24 s with 5,000 files), so on
the request path it runs in a thread: `refresh_async` (always a fresh scan, shared by the
callers waiting at once) and `lookup` (an unknown name rescans at most once per
`rescan_interval`, and every request asking meanwhile shares that scan or none).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, NoReturn, Sequence

import structlog

from .config import Config, ModelConfig
from .errors import ModelNotFound
from .store.gguf import GGUFError, is_reranker
from .store.gguf import header as gguf_header
from .workers.backends import LaunchSpec, resolve_backend

if TYPE_CHECKING:
    from .store.store import Store

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class ModelEntry:
    name: str
    launch: LaunchSpec
    source: str  # "config" | "store" | "ollama" | "discovered:<tool>"
    keep_alive: float | None = None
    aliases: tuple[str, ...] = ()
    options: Mapping[str, Any] = field(default_factory=dict)
    system: str | None = None
    template: str | None = None
    preload: bool = False
    digest: str = ""
    size: int = 0
    modified_at: dt.datetime | None = None
    location: str = ""  # where it came from, for messages and `list --sources`
    license: str | None = None
    # Local replicas (`replicas: N`): the first entry lists its siblings' names
    # ("<name>#2".."#N"); each sibling names the model it is a copy of and is not listed.
    replicas: tuple[str, ...] = ()
    replica_of: str = ""

    @property
    def defaults(self) -> dict[str, Any]:
        """What the translators merge under a request: default options and system prompt."""
        return {"options": dict(self.options), "system": self.system}


def _file_facts(path: str) -> tuple[int, dt.datetime | None]:
    try:
        st = os.stat(path)
    except OSError:
        return 0, None
    return st.st_size, dt.datetime.fromtimestamp(st.st_mtime, dt.timezone.utc)


def _gguf_reranker(path: str) -> bool:
    """A reranker GGUF (rank pooling) is started with --reranking (one cached header read)."""
    if not path.endswith(".gguf"):
        return False
    try:
        return is_reranker(gguf_header(path))
    except (OSError, GGUFError):
        return False


def entry_from_config(m: ModelConfig, *, store: Any, llama_server: str | None) -> ModelEntry:
    path, source_extra = m.model, {}
    if m.backend != "command" and m.model and not Path(os.path.expanduser(m.model)).exists():
        pulled = store.resolve(m.model) if store is not None else None
        if pulled is not None:
            path = str(pulled.gguf_path)
            source_extra = {"template": pulled.template, "system": m.system or pulled.system,
                            "options": {**pulled.params, **m.options}}
    path = os.path.expandvars(os.path.expanduser(path)) if path else ""
    size, mtime = _file_facts(path) if path else (0, None)
    launch = LaunchSpec(
        model=m.name, path=path, backend=resolve_backend(m.backend, path, llama_server),
        ctx_size=m.ctx_size, parallel=m.parallel,
        gpu_layers=None if m.gpu_layers == "auto" else int(m.gpu_layers),
        embeddings=m.embeddings, args=m.args, command=m.command, gpus=m.gpus, rpc=m.rpc,
        rerank=_gguf_reranker(path) if m.rerank is None else m.rerank)
    return ModelEntry(
        name=m.name, launch=launch, source="config", keep_alive=m.keep_alive,
        aliases=m.aliases, options=source_extra.get("options", m.options),
        system=source_extra.get("system", m.system), template=source_extra.get("template"),
        preload=m.preload, size=size, modified_at=mtime, location=path or " ".join(m.command))


def entry_from_store(sm: Any, *, llama_server: str | None,
                     ctx_size: int = ModelConfig.ctx_size) -> ModelEntry:
    params = dict(sm.params or {})
    num_ctx = params.pop("num_ctx", None)
    launch = LaunchSpec(
        model=sm.name, path=str(sm.gguf_path),
        backend=resolve_backend("auto", str(sm.gguf_path), llama_server),
        ctx_size=int(num_ctx) if isinstance(num_ctx, int) and num_ctx > 0 else ctx_size,
        projector=str(sm.projector_path) if sm.projector_path else None,
        rerank=_gguf_reranker(str(sm.gguf_path)))
    return ModelEntry(
        name=sm.name, launch=launch, source="ollama" if sm.readonly else "store",
        options=params, system=sm.system, template=sm.template, digest=sm.digest,
        size=sm.size, modified_at=sm.modified_at, location=str(sm.gguf_path),
        license=sm.license)


def _renamed(e: ModelEntry, taken: Mapping[str, str]) -> ModelEntry:
    from dataclasses import replace

    base, sep, tag = e.name.partition(":")
    for i in range(2, 1000):
        name = f"{base}-{i}{sep}{tag}"
        if name not in taken:
            return replace(e, name=name, aliases=(),
                           launch=replace(e.launch, model=name))
    raise RuntimeError(f"no free name for {e.name}")


def with_replicas(entry: ModelEntry, count: int) -> list[ModelEntry]:
    """`entry` and its `count - 1` local copies: each its own engine, runner and memory
    booking, named "<name>#<i>" (the engine still answers as `<name>`). peers/router.py
    spreads requests over them (and over peers serving the name)."""
    from dataclasses import replace

    if count <= 1:
        return [entry]
    names = tuple(f"{entry.name}#{i}" for i in range(2, count + 1))
    copies = [replace(entry, name=n, aliases=(), replicas=(), replica_of=entry.name)
              for n in names]
    return [replace(entry, replicas=names), *copies]


def with_load_options(entry: ModelEntry, options: Mapping[str, Any]) -> ModelEntry:
    """Ollama's load-time options on a request: num_ctx → ctx_size, num_gpu → gpu_layers."""
    from dataclasses import replace

    changes: dict[str, Any] = {}
    if isinstance(options.get("num_ctx"), int) and options["num_ctx"] > 0:
        changes["ctx_size"] = options["num_ctx"]
    if isinstance(options.get("num_gpu"), int) and options["num_gpu"] >= 0:
        changes["gpu_layers"] = options["num_gpu"]
    if not changes:
        return entry
    return replace(entry, launch=replace(entry.launch, **changes))


RESCAN_INTERVAL = 5.0  # seconds: an unknown name rescans the sources at most this often

_Built = tuple[int, dict[str, ModelEntry], dict[str, str], list[tuple[str, str]]]


class Catalog:
    """Name → ModelEntry, rebuilt by `refresh()` (start, SIGHUP, pull, delete) or, off the
    event loop, by `refresh_async()` and `lookup()`."""

    def __init__(self, config: Config, *, store: Store | None = None,
                 llama_server: str | None = None,
                 discovered: Callable[[], Iterable[ModelEntry]] | None = None,
                 rescan_interval: float = RESCAN_INTERVAL) -> None:
        self.config, self.store, self.llama_server = config, store, llama_server
        self._discovered = discovered
        self.rescan_interval = rescan_interval
        self._entries: dict[str, ModelEntry] = {}
        self._names: dict[str, str] = {}
        self.shadowed: list[tuple[str, str]] = []  # (name, location) of entries that lost a name
        self.gone: dict[str, str] = {}  # discovered names that disappeared → where they were
        self._build_lock = threading.Lock()  # one build at a time: a thread's or the caller's
        self._built = self._applied = 0  # generations: an older build than the applied is dropped
        self._pending: asyncio.Task[None] | None = None  # a scan not started yet: new callers join
        self._running: asyncio.Task[None] | None = None  # the scan building now
        self._rescanned_at = float("-inf")  # monotonic time of the last unknown-name rescan
        # Names no local source has, asked of the peers (routerd/peers/): local wins.
        self.remote: Callable[[str], ModelEntry | None] | None = None
        self.refresh()

    def refresh(self, config: Config | None = None) -> None:
        """Rebuild now, in the caller's thread (start, SIGHUP, after a pull or a delete)."""
        if config is not None:
            self.config = config
        self._apply(self._build())

    async def refresh_async(self) -> None:
        """Rebuild in a thread: the listing sees what is on disk now, and callers asking at
        once share one scan (one that had not started when they asked)."""
        await asyncio.shield(self._scan())

    async def close(self) -> None:
        """Wait for a scan still in its thread (a build cannot be interrupted)."""
        for task in (self._pending, self._running):
            if task is not None:
                await asyncio.wait({task})

    def _scan(self) -> asyncio.Task[None]:
        """The scan a caller asking now can rely on: the pending one, or a new one that runs
        once the running one is done."""
        if self._pending is None:
            self._pending = asyncio.get_running_loop().create_task(
                self._run_scan(self._running))
        return self._pending

    async def _run_scan(self, before: asyncio.Task[None] | None) -> None:
        if before is not None:
            await asyncio.wait({before})
        self._running, self._pending = self._pending, None
        try:
            t0 = time.monotonic()
            built = await asyncio.to_thread(self._build)
            self._apply(built)
            log.debug("catalog.scanned", models=len(self._entries),
                      seconds=round(time.monotonic() - t0, 3))
        finally:
            self._running = None

    def _rescan_due(self) -> bool:
        """An unknown name may rescan: none ran in the last rescan_interval seconds."""
        now = time.monotonic()
        if now - self._rescanned_at < self.rescan_interval:
            return False
        self._rescanned_at = now
        return True

    def _build(self) -> _Built:
        with self._build_lock:
            self._built += 1
            return (self._built, *self._collect())

    def _collect(self) -> tuple[dict[str, ModelEntry], dict[str, str], list[tuple[str, str]]]:
        entries: dict[str, ModelEntry] = {}
        names: dict[str, str] = {}
        shadowed: list[tuple[str, str]] = []

        def add(e: ModelEntry) -> None:
            if any(k in names for k in (e.name, *e.aliases)):
                if not e.source.startswith("discovered"):
                    shadowed.append((e.name, e.location))
                    return
                e = _renamed(e, names)  # a discovered model never takes a claimed name
            keys = [e.name, *e.aliases]
            if e.name.endswith(":latest"):
                keys.append(e.name[: -len(":latest")])
            entries[e.name] = e
            for k in keys:
                names.setdefault(k, e.name)

        for m in self.config.models.values():
            for e in with_replicas(entry_from_config(m, store=self.store,
                                                     llama_server=self.llama_server),
                                   m.replicas):
                add(e)
        if self.store is not None:
            for sm in self.store.list_models():
                add(entry_from_store(sm, llama_server=self.llama_server))
        if self._discovered is not None:
            for e in self._discovered():
                add(e)
        return entries, names, shadowed

    def _apply(self, built: _Built) -> None:
        generation, entries, names, shadowed = built
        if generation < self._applied:
            return  # a newer build is in place already
        self._applied = generation
        previous = self._entries
        self._entries, self._names, self.shadowed = entries, names, shadowed
        for name, old in previous.items():
            if name not in entries and old.source.startswith("discovered"):
                self.gone[name] = old.location
        for name in entries:
            self.gone.pop(name, None)

    def entries(self) -> list[ModelEntry]:
        return list(self._entries.values())

    def get(self, name: str) -> ModelEntry | None:
        canonical = self._names.get(name)
        if canonical is None and ":" not in name:
            canonical = self._names.get(f"{name}:latest")
        if canonical is None and self.remote is not None:
            return self.remote(name)
        return self._entries.get(canonical) if canonical else None

    def _may_be_new(self, name: str) -> bool:
        """A name that a pull by another process (a copy, `ollama pull`) could have added."""
        return self.store is not None and ("/" in name or ":" in name)

    async def lookup(self, name: str) -> ModelEntry:
        """`resolve` for the request path: an unknown name that could be new waits for a
        rescan in a thread: the one running, else a new one at most every rescan_interval."""
        entry = self.get(name)
        if entry is None and self._may_be_new(name):
            scanning = self._pending or self._running
            if scanning is not None:
                await asyncio.shield(scanning)
            elif self._rescan_due():
                log.info("catalog.rescan", name=name[:200], reason="unknown name")
                await asyncio.shield(self._scan())
            entry = self.get(name)
        return entry if entry is not None else self._not_found(name)

    def resolve(self, name: str) -> ModelEntry:
        """The entry for a name or alias, else ModelNotFound. Never scans on an event loop:
        an unknown name that could be new starts a rescan in a thread (at most every
        rescan_interval) for the requests after it; `lookup` waits for that scan."""
        entry = self.get(name)
        if entry is None and self._may_be_new(name) and self._rescan_due():
            try:
                asyncio.get_running_loop()
            except RuntimeError:  # no loop to block (a tool, a test): scan here
                self.refresh()
                entry = self.get(name)
            else:
                log.info("catalog.rescan", name=name[:200], reason="unknown name")
                self._scan()  # owned by the catalog; close() waits for it
        return entry if entry is not None else self._not_found(name)

    def _not_found(self, name: str) -> NoReturn:
        if name in self.gone:
            raise ModelNotFound(f"model {name!r} not found: it was at {self.gone[name]}, "
                                "which no longer exists")
        raise ModelNotFound(f"model {name!r} not found, try pulling it first")

    def names(self) -> Sequence[str]:
        return list(self._entries)
