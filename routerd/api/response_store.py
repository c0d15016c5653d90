"""Stored Responses (`previous_response_id`, GET/DELETE /v1/responses/{id}).

One JSON file per response under `<state_dir>/responses/`, written atomically (a temporary
file, fsync, rename), so a restart keeps them and a crash never leaves half a file. The index
in memory holds only ids, sizes and times; a stored response is read when asked for. Bounded
three ways: by count, by total bytes (oldest dropped first) and by age (a TTL, checked on
every read and on each write). Ids are checked against their pattern before any path is built.
A request with `store: false` stores nothing.

What is stored: the response object the client saw, and the conversation that continues it
(chat messages: the earlier history, this turn's input, this turn's output; not the
instructions, which OpenAI does not carry over).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import structlog

log = structlog.get_logger(__name__)

_ID = re.compile(r"^resp_[0-9a-f]{32}$")
MAX_COUNT = 10_000
MAX_BYTES = 256 << 20
TTL_S = 30 * 86400.0  # OpenAI keeps stored responses 30 days


@dataclass
class Stored:
    response: dict[str, Any]
    history: list[dict[str, Any]]


@dataclass
class _Entry:
    size: int
    mtime: float


class ResponseStore:
    def __init__(self, root: Path, *, max_count: int = MAX_COUNT, max_bytes: int = MAX_BYTES,
                 ttl: float = TTL_S, clock: Callable[[], float] = time.time) -> None:
        self.root = root
        self.max_count, self.max_bytes, self.ttl = max_count, max_bytes, ttl
        self._clock = clock
        self._index: dict[str, _Entry] = {}  # insertion order = age order
        self._bytes = 0
        self._load()

    def _load(self) -> None:
        """Index what an earlier run left: names, sizes and times only; stray temp files go."""
        if not self.root.is_dir():
            return
        found: list[tuple[float, str, int]] = []
        for path in self.root.iterdir():
            if path.name.startswith(".tmp"):
                with contextlib.suppress(OSError):
                    path.unlink()
                continue
            rid = path.name.removesuffix(".json")
            if not path.name.endswith(".json") or not _ID.match(rid):
                continue
            with contextlib.suppress(OSError):
                st = path.stat()
                found.append((st.st_mtime, rid, st.st_size))
        for mtime, rid, size in sorted(found):
            self._index[rid] = _Entry(size, mtime)
            self._bytes += size
        self._trim()

    def __len__(self) -> int:
        return len(self._index)

    @property
    def bytes(self) -> int:
        return self._bytes

    def _path(self, rid: str) -> Path:
        return self.root / f"{rid}.json"

    def _expired(self, entry: _Entry) -> bool:
        return self._clock() - entry.mtime > self.ttl

    def get(self, rid: str) -> Stored | None:
        if not _ID.match(rid):
            return None
        entry = self._index.get(rid)
        if entry is None:
            return None
        if self._expired(entry):
            self._drop(rid)
            return None
        try:
            data = json.loads(self._path(rid).read_bytes())
        except (OSError, ValueError) as e:
            log.warning("responses.unreadable", id=rid, error=str(e))
            self._drop(rid)
            return None
        return Stored(data["response"], data["history"])

    def put(self, response: dict[str, Any], history: list[dict[str, Any]]) -> None:
        rid = response["id"]
        if not _ID.match(rid):
            raise ValueError(f"not a response id: {rid!r}")
        raw = json.dumps({"response": response, "history": history},
                         ensure_ascii=False, separators=(",", ":")).encode()
        if len(raw) > self.max_bytes:
            log.warning("responses.too_large", id=rid, size=len(raw))
            return
        try:  # bookkeeping fails softly: the answer is never lost to a full or broken disk
            self.root.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".tmp", dir=self.root)
        except OSError as e:
            log.warning("responses.store_failed", id=rid, error=str(e))
            return
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(raw)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self._path(rid))
        except BaseException as e:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            if not isinstance(e, OSError):
                raise
            log.warning("responses.store_failed", id=rid, error=str(e))
            return
        if rid in self._index:
            self._bytes -= self._index.pop(rid).size
        self._index[rid] = _Entry(len(raw), self._clock())
        self._bytes += len(raw)
        self._trim()

    def delete(self, rid: str) -> bool:
        if not _ID.match(rid) or rid not in self._index:
            return False
        expired = self._expired(self._index[rid])
        self._drop(rid)
        return not expired

    def _drop(self, rid: str) -> None:
        entry = self._index.pop(rid, None)
        if entry is not None:
            self._bytes -= entry.size
        with contextlib.suppress(FileNotFoundError):
            self._path(rid).unlink()

    def _trim(self) -> None:
        """Oldest first: past the TTL, then beyond the count, then beyond the bytes."""
        while self._index:
            rid, entry = next(iter(self._index.items()))
            if (self._expired(entry) or len(self._index) > self.max_count
                    or self._bytes > self.max_bytes):
                self._drop(rid)
            else:
                break
