"""Content-addressed blobs: atomic writes, verified uploads, resumable downloads.

Nothing becomes ``blobs/sha256-<hex>`` before its bytes were hashed and matched:
downloads and uploads go to a ``-partial``/``-upload-*`` file first, are verified and
then renamed (same directory, so the rename is atomic) and the directory is fsynced.

A download is split into parallel HTTP Range parts.  Their progress is kept in a
sidecar ``<partial>.json`` (written after an fdatasync of the partial, so it never
claims bytes that are not on disk): a cut connection, a stopped daemon or a crash
resumes from there.  Failed parts are retried with exponential backoff, a bounded
number of attempts in a row without progress.  Space for the whole blob is reserved
up front (posix_fallocate) so a full disk fails at once; ENOSPC at any point deletes
the partial and its sidecar and raises StorageFull.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hashlib
import json
import math
import os
import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncGenerator, AsyncIterator, Callable, Protocol

import aiohttp
import structlog

from ..errors import BadRequest, RouterdError
from .names import blob_filename

log = structlog.get_logger(__name__)

_HASH_CHUNK = 4 * 1024 * 1024
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class DigestMismatch(RouterdError):
    """Downloaded bytes do not hash to the digest the manifest promised."""

    status = 500
    code = "digest_mismatch"

    def __init__(self, want: str, got: str) -> None:
        super().__init__(f"digest mismatch, file must be downloaded again: "
                         f"want sha256:{want}, got sha256:{got}")


class StorageFull(RouterdError):
    status = 507
    code = "insufficient_storage"


class DownloadError(RouterdError):
    """The remote side failed for good (bad status, attempts used up, protocol error)."""

    status = 502
    code = "download_failed"


class RetryableError(Exception):
    """A transient remote failure (5xx, short read): the part is tried again."""


class _DiskError(Exception):
    def __init__(self, err: OSError) -> None:
        super().__init__(str(err))
        self.err = err


# ---------------------------------------------------------------- small helpers


def fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same directory + fsync + rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def hash_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def write_blob_bytes(blobs_dir: Path, data: bytes) -> tuple[str, bool]:
    """Store small content; returns (hex digest, created)."""
    digest = hashlib.sha256(data).hexdigest()
    path = blobs_dir / blob_filename(digest)
    if path.exists() and path.stat().st_size == len(data):
        return digest, False
    atomic_write(path, data)
    return digest, True


def _unlink(*paths: Path) -> None:
    for p in paths:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def _is_disk_full(err: BaseException) -> bool:
    return isinstance(err, OSError) and err.errno in _DISK_FULL


async def receive_blob(blobs_dir: Path, want: str, chunks: AsyncIterator[bytes]) -> bool:
    """Stream an upload into the store, verified; returns False when it already existed.

    Raises BadRequest on a digest mismatch (nothing is kept) and StorageFull on ENOSPC."""
    final = blobs_dir / blob_filename(want)
    if final.exists():
        return False
    blobs_dir.mkdir(parents=True, exist_ok=True)
    tmp = blobs_dir / f"{final.name}-upload-{secrets.token_hex(6)}"
    h = hashlib.sha256()
    try:
        with open(tmp, "wb") as f:
            async for chunk in chunks:
                h.update(chunk)
                await asyncio.to_thread(f.write, chunk)
            await asyncio.to_thread(os.fsync, f.fileno())
        got = h.hexdigest()
        if got != want:
            raise BadRequest(f"digest mismatch, expected \"sha256:{want}\", got \"sha256:{got}\"")
        os.replace(tmp, final)
        fsync_dir(blobs_dir)
    except OSError as e:
        _unlink(tmp)
        if _is_disk_full(e):
            raise StorageFull(f"no space left on device while writing sha256:{want}") from None
        raise
    except BaseException:
        _unlink(tmp)
        raise
    return True


# ---------------------------------------------------------------- resumable download


class RangeSource(Protocol):
    """Where a blob's bytes come from.  ``stream(start, end)`` yields bytes [start, end)."""

    ranges: bool  # False: the server ignores Range; only whole-file attempts work

    def stream(self, start: int, end: int) -> AsyncGenerator[bytes, None]: ...


@dataclass(frozen=True)
class DownloadPolicy:
    part_size: int = 64 * 1024 * 1024
    max_parts: int = 16
    concurrency: int = 8
    max_attempts: int = 6  # in a row without progress
    backoff: float = 1.0
    max_backoff: float = 30.0
    flush_interval: float = 1.0
    buffer_size: int = 1024 * 1024


@dataclass
class Part:
    offset: int
    size: int
    completed: int = 0


def plan_parts(total: int, policy: DownloadPolicy) -> list[Part]:
    if total <= 0:
        return []
    n = max(1, min(policy.max_parts, math.ceil(total / max(1, policy.part_size))))
    size = math.ceil(total / n)
    return [Part(off, min(size, total - off)) for off in range(0, total, size)]


_RETRYABLE = (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError, RetryableError)


class BlobDownload:
    """One blob downloaded into ``partial``; ``run()`` verifies it and moves it into place.

    ``key`` identifies the content (``sha256:<hex>`` or a URL) and ``validator`` an
    ETag or similar: a sidecar written for another key, size or validator is ignored."""

    def __init__(self, partial: Path, total: int, source: RangeSource, policy: DownloadPolicy,
                 *, key: str, want: str | None, final_for: Callable[[str], Path],
                 validator: str | None = None, resumable: bool = True) -> None:
        self.partial = partial
        self.sidecar = partial.with_name(partial.name + ".json")
        self.total = total
        self.source = source
        self.policy = policy
        self.key = key
        self.want = want
        self.final_for = final_for
        self.validator = validator
        self.resumable = resumable
        self.parts: list[Part] = []
        self.resumed_from = 0
        self._fd = -1

    @property
    def completed(self) -> int:
        return sum(p.completed for p in self.parts)

    async def run(self) -> str:
        """Download, verify and rename; returns the hex digest of the stored blob."""
        try:
            self._open()
            stop = asyncio.Event()
            flusher = asyncio.create_task(self._flush_loop(stop))
            try:
                await self._run_parts()
            finally:  # not cancelled: a sidecar write in its thread must finish first
                stop.set()
                await asyncio.gather(flusher, return_exceptions=True)
            await asyncio.to_thread(os.fsync, self._fd)
        except _DiskError as e:
            self._close()
            _unlink(self.partial, self.sidecar)
            if _is_disk_full(e.err):
                raise StorageFull(f"no space left on device for {self.key} "
                                  f"({self.total} bytes)") from None
            raise DownloadError(f"cannot write {self.partial.name}: {e.err}") from None
        except BaseException:
            self._save_state()
            self._close()
            raise
        self._close()
        return await asyncio.to_thread(self._verify_and_store)

    # ---------------------------------------------------------------- file and sidecar

    def _open(self) -> None:
        self.partial.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.partial, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DownloadError(f"{self.partial.name} is being downloaded by another process"
                                ) from None
        self._fd = fd
        try:
            parts = self._load_state()
            if parts is None:
                parts = (plan_parts(self.total, self.policy) if self.source.ranges
                         else [Part(0, self.total)] if self.total > 0 else [])
                _unlink(self.sidecar)
                os.ftruncate(fd, 0)
                self._reserve()
            self.parts = parts
            self.resumed_from = self.completed
        except BaseException:
            self._close()
            raise

    def _reserve(self) -> None:
        if self.total <= 0:
            return
        try:
            os.posix_fallocate(self._fd, 0, self.total)
        except AttributeError:  # not on this platform (macOS)
            os.ftruncate(self._fd, self.total)
        except OSError as e:
            if _is_disk_full(e):
                raise _DiskError(e) from None
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
            os.ftruncate(self._fd, self.total)

    def _load_state(self) -> list[Part] | None:
        if not self.resumable:
            return None
        try:
            state = json.loads(self.sidecar.read_text())
            if (state.get("key"), state.get("total"), state.get("validator")) != (
                    self.key, self.total, self.validator):
                return None
            if os.fstat(self._fd).st_size != self.total:
                return None
            parts = [Part(int(o), int(s), int(c)) for o, s, c in state["parts"]]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        pos = 0
        for p in parts:
            if p.offset != pos or p.size <= 0 or not 0 <= p.completed <= p.size:
                return None
            pos += p.size
        return parts if pos == self.total else None

    def _state(self) -> bytes:
        return json.dumps({"key": self.key, "total": self.total, "validator": self.validator,
                           "parts": [[p.offset, p.size, p.completed] for p in self.parts]}).encode()

    def _save_state(self) -> None:
        """fdatasync the partial, then record progress (never claims unsynced bytes)."""
        if self._fd < 0 or not self.parts or not self.source.ranges:
            return
        data = self._state()
        try:
            os.fdatasync(self._fd)
            atomic_write(self.sidecar, data)
        except OSError as e:
            log.warning("pull.sidecar_failed", file=self.sidecar.name, error=str(e))

    async def _flush_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), self.policy.flush_interval)
            if self.source.ranges and not stop.is_set():
                data = self._state()  # snapshot before the sync: only written bytes counted
                await asyncio.to_thread(self._sync_and_write, data)

    def _sync_and_write(self, data: bytes) -> None:
        try:
            os.fdatasync(self._fd)
            atomic_write(self.sidecar, data)
        except OSError as e:
            log.warning("pull.sidecar_failed", file=self.sidecar.name, error=str(e))

    def _close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _verify_and_store(self) -> str:
        got = hash_file(self.partial)
        if self.want is not None and got != self.want:
            _unlink(self.partial, self.sidecar)
            raise DigestMismatch(self.want, got)
        final = self.final_for(got)
        os.replace(self.partial, final)
        fsync_dir(final.parent)
        _unlink(self.sidecar)
        return got

    # ---------------------------------------------------------------- parts

    async def _run_parts(self) -> None:
        sem = asyncio.Semaphore(max(1, self.policy.concurrency))

        async def one(part: Part) -> None:
            async with sem:
                await self._run_part(part)

        tasks = [asyncio.create_task(one(p)) for p in self.parts if p.completed < p.size]
        if not tasks:
            return
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for t in done:
                if not t.cancelled() and t.exception() is not None:
                    raise t.exception()  # type: ignore[misc]
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _run_part(self, part: Part) -> None:
        failures = 0
        while part.completed < part.size:
            before = part.completed
            try:
                await self._fetch(part)
                if part.completed < part.size:
                    raise RetryableError("connection closed early")
            except _RETRYABLE as e:
                if not self.source.ranges:
                    part.completed = 0  # no Range support: start over
                failures = 0 if part.completed > before else failures + 1
                if failures >= self.policy.max_attempts:
                    raise DownloadError(f"downloading {self.key}: giving up after "
                                        f"{failures} attempts: {describe(e)}") from None
                delay = min(self.policy.max_backoff,
                            self.policy.backoff * 2 ** max(0, failures - 1))
                log.info("pull.part_retry", key=self.key, offset=part.offset,
                         completed=part.completed, error=describe(e), delay=delay)
                await asyncio.sleep(delay)

    async def _fetch(self, part: Part) -> None:
        end = part.offset + part.size
        pos = part.offset + part.completed
        buf = bytearray()
        try:
            async with contextlib.aclosing(self.source.stream(pos, end)) as chunks:
                async for chunk in chunks:
                    room = end - pos - len(buf)
                    buf += chunk[:room] if len(chunk) > room else chunk
                    if len(buf) >= self.policy.buffer_size or pos + len(buf) >= end:
                        data, buf = bytes(buf), bytearray()
                        await asyncio.to_thread(self._write, pos, data)
                        pos += len(data)
                        part.completed += len(data)
                    if pos >= end:
                        break
        finally:
            if buf:  # bytes received before a failure are good: keep them
                with contextlib.suppress(_DiskError):
                    self._write(pos, bytes(buf))
                    part.completed += len(buf)

    def _write(self, pos: int, data: bytes) -> None:
        view = memoryview(data)
        try:
            while view:
                n = os.pwrite(self._fd, view, pos)
                view, pos = view[n:], pos + n
        except OSError as e:
            raise _DiskError(e) from None


def describe(e: BaseException) -> str:
    """A short, log-friendly reason for a network failure."""
    if isinstance(e, asyncio.TimeoutError):
        return "timed out (stalled)"
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
