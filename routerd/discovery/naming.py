"""Names for discovered models: valid Ollama grammar, stable, saying where they came from.

``<host>/<namespace>/<model>:<tag>`` (or ``<namespace>/<model>:<tag>``), all lowercase.
Ollama's rules (types/model/name.go): the host may hold dots, the namespace may not, the
model and tag may; every part starts with a letter or digit here and holds at most 80
characters. The tag is the quantisation read from the GGUF header (``q4_k_m``).
"""

from __future__ import annotations

import re
from typing import Sequence

MAX_PART = 80
_BAD_RE = re.compile(r"[^a-z0-9._-]+")
_NS_BAD_RE = re.compile(r"[^a-z0-9_-]+")
_RUNS_RE = re.compile(r"([._-])[._-]+")
_SPLIT_RE = re.compile(r"-\d{5}-of-\d{5}$", re.IGNORECASE)


def part(text: str, *, dots: bool = True, fallback: str = "model") -> str:
    """One name part: lowercase, runs of other characters become one ``-``."""
    s = (_BAD_RE if dots else _NS_BAD_RE).sub("-", text.lower())
    s = _RUNS_RE.sub(r"\1", s)
    s = s.lstrip("._-")[:MAX_PART].rstrip("._-")
    return s or fallback


def tag(quant: str) -> str:
    return part(quant, fallback="unknown")


def model_name(prefix: Sequence[str], tag_: str) -> str:
    """``prefix`` is (namespace, model) or (host, namespace, model), raw; returns the name."""
    parts = list(prefix)
    cleaned = [part(p, dots=(i != len(parts) - 2)) for i, p in enumerate(parts)]
    return "/".join(cleaned) + ":" + tag_


def model_stem(filename: str, quant: str) -> str:
    """The file name without ``.gguf``, a split suffix, or a trailing quantisation."""
    stem = filename[:-5] if filename.lower().endswith(".gguf") else filename.rsplit(".", 1)[0]
    stem = _SPLIT_RE.sub("", stem)
    if quant and quant != "unknown":
        trimmed = re.sub(rf"[-._ ]{re.escape(quant)}$", "", stem, flags=re.IGNORECASE)
        stem = trimmed or stem
    return stem


def file_stem(filename: str) -> str:
    """The file name without ``.gguf`` and a split suffix (what tells two files apart)."""
    stem = filename[:-5] if filename.lower().endswith(".gguf") else filename.rsplit(".", 1)[0]
    return _SPLIT_RE.sub("", stem)


def distinct(wanted: Sequence[tuple[str, str, tuple]]) -> list[str]:
    """Unique names for (name, file stem, order key) triples, in the same order.

    Of the files that want one name, the first by order key (oldest, then path) keeps
    it; the others get ``<tag>-<file stem>`` as their tag, then a counter if even that
    is taken. Adding a newer file therefore never renames an older one."""
    by_name: dict[str, list[int]] = {}
    for i, (name, _, _) in enumerate(wanted):
        by_name.setdefault(name, []).append(i)
    out = [w[0] for w in wanted]
    taken = set(by_name)
    for base, idxs in sorted(by_name.items()):
        idxs.sort(key=lambda i: wanted[i][2])
        head, _, t = base.rpartition(":")
        for i in idxs[1:]:
            longer = part(f"{t}-{wanted[i][1]}", fallback=t)
            candidate, n = f"{head}:{longer}", 2
            while candidate in taken:
                candidate = f"{head}:{longer[:MAX_PART - 6]}-{n}"
                n += 1
            taken.add(candidate)
            out[i] = candidate
    return out
