"""Each tool's folder layout turned into candidate files with the name parts they imply.

A candidate is a file that looks like a model (``.gguf``, an old ``.bin``, or an
unfinished download of one) plus what its name will be made of: the ``prefix`` parts
(``("hf", org, repo)``) and, for flat folders, the file's own stem as the model part.
Projectors are attached to the models of the same ``group`` (their folder, or their
repository in llama.cpp's flat cache).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .scan import SmallFiles, kind_of, walk

_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")


@dataclass(frozen=True)
class Candidate:
    tool: str  # the discovery toggle it belongs to: gpt4all, lmstudio, huggingface, ...
    path: Path
    st: os.stat_result | None
    kind: str  # gguf | bin | partial
    group: str
    prefix: tuple[str, ...]
    stem_model: bool  # the model part of the name is the file's stem


def _files(root: Path, depth: int, allow_bin: bool
           ) -> Iterator[tuple[Path, os.stat_result | None, str, tuple[str, ...]]]:
    for path, st in walk(root, depth):
        kind = kind_of(path.name, allow_bin)
        if kind is not None:
            yield path, st, kind, path.relative_to(root).parts[:-1]


def flat(tool: str, root: Path, prefix: tuple[str, ...], *, depth: int = 0,
         allow_bin: bool = False) -> Iterator[Candidate]:
    """A folder of model files named after themselves (GPT4All, model_dirs)."""
    for path, st, kind, _ in _files(root, depth, allow_bin):
        yield Candidate(tool, path, st, kind, str(path.parent), prefix, True)


def lmstudio(root: Path) -> Iterator[Candidate]:
    """``<root>/<publisher>/<repo>/*.gguf`` (a level deeper is tolerated)."""
    for path, st, kind, rel in _files(root, 3, False):
        if len(rel) >= 2:
            yield Candidate("lmstudio", path, st, kind, str(path.parent),
                            ("lmstudio", rel[0], rel[1]), False)
        else:
            yield Candidate("lmstudio", path, st, kind, str(path.parent),
                            ("lmstudio", *rel), True)


def hub_cache(tool: str, root: Path, host: str, refs: SmallFiles) -> Iterator[Candidate]:
    """``models--<org>--<repo>/snapshots/<rev>/**`` of a Hugging Face hub cache; the
    revision ``refs/main`` names, else the newest snapshot."""
    try:
        with os.scandir(root) as it:
            repos = sorted(e.name for e in it if e.name.startswith("models--") and e.is_dir())
    except OSError:
        return
    for folder in repos:
        names = [n for n in folder[len("models--"):].split("--") if n]
        if not names:
            continue
        snapshot = _revision(root / folder, refs)
        if snapshot is None:
            continue
        prefix = (host, names[0], "-".join(names[1:])) if len(names) > 1 else (host, names[0])
        for path, st, kind, _ in _files(snapshot, 3, False):
            yield Candidate(tool, path, st, kind, str(path.parent), prefix, False)


def _revision(repo: Path, refs: SmallFiles) -> Path | None:
    main = refs.read(repo / "refs" / "main")
    if main and _COMMIT_RE.match(main) and (repo / "snapshots" / main).is_dir():
        return repo / "snapshots" / main
    try:
        with os.scandir(repo / "snapshots") as it:
            snaps = [(e.stat().st_mtime_ns, e.name) for e in it
                     if not e.name.startswith(".") and e.is_dir()]
    except OSError:
        return None
    return repo / "snapshots" / max(snaps)[1] if snaps else None


def llama_cpp(root: Path, refs: SmallFiles) -> Iterator[Candidate]:
    """llama.cpp's cache: flat ``<org>_<repo>_<file>.gguf`` files (``-hf`` downloads before
    it moved to the hub layout, and ``-dr`` Docker models ``<org>_<repo>_<tag>.gguf``), and
    the hub layout itself (``models--*``, used when ``LLAMA_CACHE`` is set)."""
    known = _manifest_repos(root)
    for path, st, kind, _ in _files(root, 0, False):
        org, repo = split_flat_name(path.name, known)
        yield Candidate("llama_cpp", path, st, kind, f"{path.parent}/{org}_{repo}",
                        ("llamacpp", org, repo), False)
    yield from hub_cache("llama_cpp", root, "llamacpp", refs)


def _manifest_repos(root: Path) -> list[str]:
    """``<org>_<repo>`` from llama.cpp's cached manifests, ``manifest=<org>_<repo>=<tag>.json``
    (their names say where a repository's name ends; their contents are not needed)."""
    try:
        with os.scandir(root) as it:
            found = {e.name.split("=")[1] for e in it
                     if e.name.startswith("manifest=") and e.name.count("=") >= 2}
    except OSError:
        return []
    return sorted(found, key=len, reverse=True)


def split_flat_name(name: str, known: list[str]) -> tuple[str, str]:
    """(org, repo) from ``<org>_<repo>_<file>`` where every ``/`` became ``_``.

    The join is ambiguous, so: a repository named by a cached manifest wins; else the org
    ends at the first ``_`` (Hugging Face user names have none) and the repository at the
    first following ``_`` that ends a ``...GGUF`` name, else at the next ``_``."""
    lower = name.lower()
    for org_repo in known:
        if lower.startswith(org_repo.lower() + "_") and "_" in org_repo:
            org, repo = org_repo.split("_", 1)
            return org, repo
    stem = name[:-5] if lower.endswith(".gguf") else name
    org, _, rest = stem.partition("_")
    if not rest:
        return "local", org
    cuts = [i for i, c in enumerate(rest) if c == "_"]
    for i in cuts:
        if rest[:i].lower().endswith("gguf"):
            return org, rest[:i]
    return org, rest[: cuts[0]] if cuts else rest
