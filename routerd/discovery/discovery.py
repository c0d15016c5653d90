"""Models already on this machine: what GPT4All, LM Studio, the Hugging Face cache,
llama.cpp's cache and the folders in ``model_dirs`` hold, served where they lie.

``Discovery(config, env).entries(llama_server)`` lists every usable GGUF as a catalog
``ModelEntry`` named ``<tool>/.../<model>:<quant>``; the catalog calls it at start, on
SIGHUP and on ``POST /api/refresh``. Ollama's own stores are not parsed here:
``ollama_dirs()`` hands them to the model store, which reads Ollama's layout.

Files are only read, and only their headers, once per (path, size, mtime). Unfinished
downloads, old GGML files and truncated GGUFs are skipped with one warning each.
"""

from __future__ import annotations

import datetime as dt
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import structlog

from ..catalog import ModelEntry
from ..config import Config, ModelConfig
from ..workers.backends import LaunchSpec, resolve_backend
from . import naming, paths, sources
from .scan import Facts, HeaderCache, Skips, SmallFiles, split_index, split_part_paths

__all__ = ["Discovery", "format_sources"]

log = structlog.get_logger(__name__)

DEFAULT_CTX = ModelConfig.ctx_size
TOOLS = ("gpt4all", "lmstudio", "huggingface", "llama_cpp", "model_dirs")


@dataclass(frozen=True)
class Found:
    """A usable model file: the candidate, its header facts and its on-disk parts."""

    cand: sources.Candidate
    facts: Facts
    parts: tuple[Path, ...]
    size: int
    mtime: float

    @property
    def is_projector(self) -> bool:
        return "mmproj" in self.cand.path.name.lower() or self.facts.architecture == "clip"


class Discovery:
    """Scans the tools' folders; keeps only caches between scans, never writes a file."""

    def __init__(self, config: Config, env: Mapping[str, str] = os.environ, *,
                 platform: str = sys.platform) -> None:
        self.config, self.env, self.platform = config, env, platform
        self.headers = HeaderCache()
        self._skips = Skips()
        self._refs = SmallFiles()
        self._missing: set[Path] = set()  # configured model_dirs already warned about

    def ollama_dirs(self) -> list[Path]:
        """Ollama's stores that exist (read-only for routerd), unless turned off."""
        if not self.config.discovery.ollama:
            return []
        return paths.existing(paths.ollama_stores(self.env))

    def roots(self) -> dict[str, list[Path]]:
        """The folders each enabled source scans (those that exist), by tool."""
        d, env, plat = self.config.discovery, self.env, self.platform
        wanted = {
            "gpt4all": paths.gpt4all_dirs(env, plat) if d.gpt4all else [],
            "lmstudio": paths.lmstudio_dirs(env, plat) if d.lmstudio else [],
            "huggingface": paths.huggingface_dirs(env, plat) if d.huggingface else [],
            "llama_cpp": paths.llama_cpp_dirs(env, plat) if d.llama_cpp else [],
            "model_dirs": [paths.expand(p, env) for p in self.config.model_dirs],
        }
        for folder in wanted["model_dirs"]:
            if folder not in self._missing and not folder.is_dir():
                self._missing.add(folder)
                log.warning("discovery.model_dir_missing", path=str(folder))
        return {tool: paths.existing(dirs) for tool, dirs in wanted.items()}

    def entries(self, llama_server: str | None) -> list[ModelEntry]:
        found = self._scan()
        models = [f for f in found if not f.is_projector]
        projectors = _projectors_by_group([f for f in found if f.is_projector])
        wanted = [(_base_name(f), naming.file_stem(f.parts[0].name), (f.mtime, str(f.cand.path)))
                  for f in models]
        names = naming.distinct(wanted)
        backend = resolve_backend("auto", "", llama_server)  # a GGUF, never a llamafile
        out = []
        stems = _stems_by_group(models)
        for f, name in zip(models, names):
            usable = [p for p in projectors.get(f.cand.group, [])
                      if len(stems[f.cand.group]) == 1 or _belongs(p, f)]
            out.append(_entry(f, name, backend, _pick_projector(usable, f.facts.quant)))
        return out

    # ------------------------------------------------------------ scanning

    def _candidates(self) -> Iterator[sources.Candidate]:
        roots = self.roots()
        for root in roots["gpt4all"]:
            yield from sources.flat("gpt4all", root, ("gpt4all",), allow_bin=True)
        for root in roots["lmstudio"]:
            yield from sources.lmstudio(root)
        for root in roots["huggingface"]:
            yield from sources.hub_cache("huggingface", root, "hf", self._refs)
        for root in roots["llama_cpp"]:
            yield from sources.llama_cpp(root, self._refs)
        for root in roots["model_dirs"]:
            yield from sources.flat("model_dirs", root, ("local", root.name or "root"),
                                    depth=4, allow_bin=True)

    def _scan(self) -> list[Found]:
        found: list[Found] = []
        seen: set[str] = set()
        for cand in self._candidates():
            f = self._check(cand)
            if f is None:
                continue
            real = os.path.realpath(f.parts[0])
            if real not in seen:  # one file in two sources (LLAMA_CACHE = HF cache): listed once
                seen.add(real)
                found.append(f)
        self.headers.sweep()
        self._skips.sweep()
        return found

    def _check(self, c: sources.Candidate) -> Found | None:
        """The candidate as a usable model file, or None (skipped, with one warning)."""
        skip = self._skips.skip
        if c.kind == "partial":
            skip(c.path, c.st, "unfinished download", c.tool)
            return None
        if c.st is None:
            skip(c.path, c.st, "broken link: its target is gone", c.tool)
            return None
        split = split_index(c.path.name)
        if split is not None and split[0] != 1:
            return None  # listed through its first part
        facts = self.headers.facts(str(c.path), c.st)
        if isinstance(facts, str):
            skip(c.path, c.st, facts, c.tool)
            return None
        if facts.n_tensors == 0:
            skip(c.path, c.st, "no tensors (a vocabulary-only GGUF)", c.tool)
            return None
        parts, size, mtime = [c.path], c.st.st_size, c.st.st_mtime
        if split is not None:
            parts = split_part_paths(c.path)
            stats = []
            for p in parts[1:]:
                try:
                    stats.append(p.stat())
                except OSError:
                    skip(c.path, c.st, f"split model is missing {p.name}", c.tool)
                    return None
            size += sum(s.st_size for s in stats)
            mtime = max([mtime, *(s.st_mtime for s in stats)])
        return Found(c, facts, tuple(parts), size, mtime)


def _base_name(f: Found) -> str:
    c = f.cand
    prefix = c.prefix
    if c.stem_model:
        prefix = (*prefix, naming.model_stem(f.parts[0].name, f.facts.quant))
    return naming.model_name(prefix, naming.tag(f.facts.quant))


def _projectors_by_group(projectors: Iterable[Found]) -> dict[str, list[Found]]:
    out: dict[str, list[Found]] = {}
    for p in projectors:
        out.setdefault(p.cand.group, []).append(p)
    return out


def _core(f: Found) -> str:
    """A file's model stem, lowercase letters and digits only (``mmproj`` removed)."""
    stem = naming.model_stem(f.parts[0].name, f.facts.quant).lower().replace("mmproj", "")
    return "".join(ch for ch in stem if ch.isalnum())


def _stems_by_group(models: Iterable[Found]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for m in models:
        out.setdefault(m.cand.group, set()).add(_core(m))
    return out


def _belongs(projector: Found, model: Found) -> bool:
    """In a folder of different models, a projector goes with the model it is named after
    (``mmproj-SmolVLM-500M-f16.gguf`` with ``SmolVLM-500M-Q8_0.gguf``)."""
    p, m = _core(projector), _core(model)
    return bool(p and m) and (p in m or m in p)


def _pick_projector(candidates: list[Found], quant: str) -> Found | None:
    """The model's own quantisation if there is one, else F16, BF16, F32, else the first."""
    if not candidates:
        return None
    order = [quant.upper(), "F16", "BF16", "F32"]

    def rank(p: Found) -> tuple[int, str]:
        q = p.facts.quant.upper()
        return (order.index(q) if q in order else len(order), p.cand.path.name)

    return min(candidates, key=rank)


def _entry(f: Found, name: str, backend: str, projector: Found | None) -> ModelEntry:
    ctx = f.facts.context_length
    launch = LaunchSpec(
        model=name, path=str(f.parts[0]), backend=backend,
        ctx_size=min(DEFAULT_CTX, ctx) if ctx > 0 else DEFAULT_CTX,
        projector=str(projector.parts[0]) if projector else None)
    return ModelEntry(
        name=name, launch=launch, source=f"discovered:{f.cand.tool}",
        size=f.size + (projector.size if projector else 0),
        modified_at=dt.datetime.fromtimestamp(f.mtime, dt.timezone.utc),
        location=str(f.parts[0]), digest="")


def format_sources(tags: list[dict[str, Any]]) -> str:
    """``routerd list --sources``: NAME, SOURCE, LOCATION from /api/tags entries."""
    rows = [["NAME", "SOURCE", "LOCATION"]]
    for m in tags:
        extra = m.get("routerd") or {}
        rows.append([str(m.get("name") or m.get("model") or ""),
                     str(extra.get("source") or ""), str(extra.get("location") or "")])
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join("    ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip()
                     for r in rows)
