"""The catalog: every model routerd can serve, by name and alias.

Sources, in precedence order: models in the config, models pulled into the store (and an
Ollama store read-only), models discovered on disk. A name is owned by the first source that
claims it; later sources never shadow it silently.
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

import structlog

from .config import Config, ModelConfig
from .errors import ModelNotFound
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
        embeddings=m.embeddings, args=m.args, command=m.command, gpus=m.gpus)
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
        projector=str(sm.projector_path) if sm.projector_path else None)
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


class Catalog:
    """Name → ModelEntry, rebuilt by `refresh()` (start, SIGHUP, pull, delete)."""

    def __init__(self, config: Config, *, store: Store | None = None,
                 llama_server: str | None = None,
                 discovered: Callable[[], Iterable[ModelEntry]] | None = None) -> None:
        self.config, self.store, self.llama_server = config, store, llama_server
        self._discovered = discovered
        self._entries: dict[str, ModelEntry] = {}
        self._names: dict[str, str] = {}
        self.shadowed: list[tuple[str, str]] = []  # (name, location) of entries that lost a name
        self.gone: dict[str, str] = {}  # discovered names that disappeared → where they were
        self.refresh()

    def refresh(self, config: Config | None = None) -> None:
        if config is not None:
            self.config = config
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
            add(entry_from_config(m, store=self.store, llama_server=self.llama_server))
        if self.store is not None:
            for sm in self.store.list_models():
                add(entry_from_store(sm, llama_server=self.llama_server))
        if self._discovered is not None:
            for e in self._discovered():
                add(e)
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
        return self._entries.get(canonical) if canonical else None

    def resolve(self, name: str) -> ModelEntry:
        entry = self.get(name)
        if entry is None and self.store is not None and ("/" in name or ":" in name):
            self.refresh()  # pulled since the last refresh (another process, a copy)
            entry = self.get(name)
        if entry is None:
            if name in self.gone:
                raise ModelNotFound(f"model {name!r} not found: it was at {self.gone[name]}, "
                                    "which no longer exists")
            raise ModelNotFound(f"model {name!r} not found, try pulling it first")
        return entry

    def names(self) -> Sequence[str]:
        return list(self._entries)
