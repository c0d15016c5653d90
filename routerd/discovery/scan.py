"""Walking folders read-only and reading GGUF headers once per (path, size, mtime).

Nothing here writes, moves or touches a file: folders are listed with ``os.scandir``, files
are ``stat``-ed, and only a GGUF's header is read (``store.gguf.read_gguf``), once per
version of the file; an unchanged tree is re-scanned with listings and stats alone.
"""

from __future__ import annotations

import os
import re
import stat as stat_mod
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import structlog

from ..store import gguf

log = structlog.get_logger(__name__)

PARTIAL_SUFFIXES = (".incomplete", ".part", ".partial", ".downloadinprogress", ".tmp",
                    ".crdownload", ".download")
PARTIAL_PREFIXES = ("incomplete-",)  # GPT4All downloads into incomplete-<file>
SPLIT_RE = re.compile(r"^(?P<stem>.+)-(?P<i>\d{5})-of-(?P<n>\d{5})\.gguf$", re.IGNORECASE)
_GGML_MAGICS = {b"lmgg": "ggml", b"fmgg": "ggmf", b"tjgg": "ggjt", b"algg": "ggla"}


@dataclass(frozen=True)
class Facts:
    """What discovery needs from a GGUF header."""

    quant: str
    context_length: int
    architecture: str
    n_tensors: int


def kind_of(name: str, allow_bin: bool) -> str | None:
    """'gguf', 'bin', 'partial' (an unfinished download) or None (not a model file)."""
    lower = name.lower()
    if ".gguf" in lower or (allow_bin and ".bin" in lower):
        if lower.startswith(PARTIAL_PREFIXES) or lower.endswith(PARTIAL_SUFFIXES):
            return "partial"
    if lower.endswith(".gguf"):
        return "gguf"
    if allow_bin and lower.endswith(".bin"):
        return "bin"
    return None


def walk(root: Path, max_depth: int) -> Iterator[tuple[Path, os.stat_result | None]]:
    """Files under ``root`` (symlinks followed, each real folder once, hidden ones skipped),
    in a stable order, with their stat; None for a link whose target is gone."""
    seen = {os.path.realpath(root)}
    stack: list[tuple[Path, int]] = [(root, 0)]
    while stack:
        folder, depth = stack.pop()
        try:
            with os.scandir(folder) as it:
                listed = sorted(it, key=lambda e: e.name)
        except OSError:
            continue
        subdirs = []
        for e in listed:
            if e.name.startswith("."):
                continue
            try:
                if e.is_dir():
                    real = os.path.realpath(e.path)
                    if depth < max_depth and real not in seen:
                        seen.add(real)
                        subdirs.append((Path(e.path), depth + 1))
                    continue
                st: os.stat_result | None = e.stat()
            except OSError:
                st = None  # a dangling symlink (a Hugging Face blob that is gone)
            if st is None or stat_mod.S_ISREG(st.st_mode):
                yield Path(e.path), st
        stack.extend(reversed(subdirs))


def split_index(name: str) -> tuple[int, int] | None:
    m = SPLIT_RE.match(name)
    return (int(m.group("i")), int(m.group("n"))) if m else None


def split_part_paths(first: Path) -> list[Path]:
    m = SPLIT_RE.match(first.name)
    if not m:
        return [first]
    n, stem = int(m.group("n")), m.group("stem")
    width = len(m.group("n"))
    return [first.with_name(f"{stem}-{i:0{width}d}-of-{m.group('n')}.gguf")
            for i in range(1, n + 1)]


def read_facts(path: str, st: os.stat_result | None = None) -> Facts | str:
    """The header's facts, or why the file is not a usable GGUF (the header itself comes
    from store/gguf.py's one header cache)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        return f"cannot read: {e.strerror}"
    if head in _GGML_MAGICS:
        return f"old {_GGML_MAGICS[head].upper()} format, not GGUF (convert it with llama.cpp)"
    try:
        info = gguf.header(path, st)
    except OSError as e:
        return f"cannot read: {e.strerror}"
    except gguf.GGUFError as e:
        return str(e).removeprefix(f"{path}: ")
    return Facts(info.quantization_level, info.context_length, info.architecture,
                 len(info.tensors))


class HeaderCache:
    """Facts per path, reused while (size, mtime) stay the same; files not seen in the
    last scan are forgotten at ``sweep()``."""

    def __init__(self) -> None:
        self._old: dict[str, tuple[int, int, Facts | str]] = {}
        self._new: dict[str, tuple[int, int, Facts | str]] = {}
        self.reads = 0

    def facts(self, path: str, st: os.stat_result) -> Facts | str:
        key = (st.st_size, st.st_mtime_ns)
        hit = self._new.get(path) or self._old.get(path)
        if hit is not None and hit[:2] == key:
            value = hit[2]
        else:
            self.reads += 1
            value = read_facts(path, st)
        self._new[path] = (*key, value)
        return value

    def sweep(self) -> None:
        self._old, self._new = self._new, {}


class SmallFiles:
    """Tiny text files (Hugging Face ``refs/main``), re-read only when they change."""

    def __init__(self) -> None:
        self._cache: dict[str, tuple[int, int, str]] = {}

    def read(self, path: Path) -> str | None:
        try:
            st = path.stat()
            hit = self._cache.get(str(path))
            if hit is not None and hit[:2] == (st.st_size, st.st_mtime_ns):
                return hit[2]
            if st.st_size > 4096:
                return None
            text = path.read_text(encoding="utf-8", errors="replace").strip()
        except OSError:
            return None
        self._cache[str(path)] = (st.st_size, st.st_mtime_ns, text)
        return text


class Skips:
    """One warning per skipped file version: a re-scan does not repeat it."""

    def __init__(self) -> None:
        self._old: set[tuple[str, int, int]] = set()
        self._new: set[tuple[str, int, int]] = set()

    def skip(self, path: Path, st: os.stat_result | None, reason: str, tool: str) -> None:
        key = (str(path), st.st_size if st else -1, st.st_mtime_ns if st else -1)
        if key not in self._old and key not in self._new:
            log.warning("discovery.skipped", path=str(path), source=tool, reason=reason)
        self._new.add(key)

    def sweep(self) -> None:
        self._old, self._new = self._new, set()
