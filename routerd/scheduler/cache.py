"""Prompt caches that survive a swap: llama-server slots saved before a stop, restored at load.

Each model's llama-server gets `--slot-save-path` in a directory of its own under
`state_dir/prompt-cache/`, named by what the KV data depends on: the model file (path, size,
mtime), the engine build (the binary's path, size, mtime), ctx_size and parallel. Two
different files never share one.

Before a worker stops (eviction, idle expiry, reload), `save` asks `GET /slots` which slots
hold a prompt and saves each (`POST /slots/{id}?action=save`). llama-server writes the file
itself, so it writes `slot-N.bin.tmp`; routerd fsyncs it, writes `slot-N.json` (size, token
count, BLAKE2b digest) and only then renames both into place: a crash or a kill mid-save
leaves only a `.tmp` that nothing restores (and the next load sweeps). The saves together
take at most `cache.save_timeout` and never more than `timeouts.stop`; one that takes longer
is abandoned.

After a load, `restore` checks each `slot-N.bin` against its `slot-N.json` (size and digest:
the vendored llama.cpp aborts on a truncated file, GGML_ASSERT in llama_state_seq_load_file)
and restores it into slot N before the first request. A file that fails either check or the
engine's own is deleted and logged. llama-server's `--slot-prompt-similarity` (default 0.10)
then sends a returning conversation to the slot whose tokens share its prefix.

Disk: every saved file of every model counts against `cache.disk_budget`; the least recently
saved or restored ones are removed first.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import structlog

from ..config import Config
from ..workers.process import WorkerLoadError

if TYPE_CHECKING:
    from ..catalog import ModelEntry
    from .runner import Runner

log = structlog.get_logger(__name__)

DIR_NAME = "prompt-cache"


def _file_id(path: str | None) -> list[Any]:
    if not path:
        return [None]
    try:
        real = os.path.realpath(path)
        st = os.stat(real)
    except OSError:
        return [path]
    return [real, st.st_size, st.st_mtime_ns]


def digest_file(path: Path) -> str:
    h = hashlib.blake2b(digest_size=20)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


class CacheKeeper:
    """Saves and restores one model's llama-server slots around its stops and loads."""

    def __init__(self, session: aiohttp.ClientSession | None, *,
                 llama_server: str | None) -> None:
        self.session, self.llama_server = session, llama_server
        self._restored: dict[int, set[int]] = {}  # id(worker) -> slots restored, unused yet
        # Saves in progress per directory: the model's next load (an engine exiting while
        # the next one starts) waits for them before it sweeps or restores.
        self._saving: dict[str, asyncio.Event] = {}

    # ------------------------------------------------------------------ where

    def root(self, config: Config) -> Path:
        return config.expand(config.state_dir) / DIR_NAME

    def enabled(self, entry: ModelEntry, config: Config) -> bool:
        if self.session is None or not config.cache.enabled:
            return False
        if entry.launch.backend != "llama-server" or config.cache.disk_budget <= 0:
            return False
        model = config.models.get(entry.name)
        return model is None or model.keep_cache

    def directory(self, entry: ModelEntry, config: Config) -> Path:
        launch = entry.launch
        key = json.dumps([_file_id(launch.path), _file_id(self.llama_server), launch.ctx_size,
                          launch.parallel])
        h = hashlib.sha256(key.encode()).hexdigest()[:20]
        safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in entry.name)[:60]
        return self.root(config) / f"{safe}-{h}"

    def launch(self, entry: ModelEntry, config: Config) -> ModelEntry:
        """The entry with its `--slot-save-path` (when its prompt cache is kept)."""
        if not self.enabled(entry, config):
            return entry
        d = self.directory(entry, config)
        try:
            d.mkdir(parents=True, exist_ok=True)
            (d / "model.json").write_text(json.dumps(
                {"model": entry.name, "path": entry.launch.path, "engine": self.llama_server,
                 "ctx_size": entry.launch.ctx_size, "parallel": entry.launch.parallel}))
            if str(d) not in self._saving:
                self._sweep_tmp(d)
        except OSError as e:
            log.warning("cache.dir_failed", model=entry.name, path=str(d), error=str(e))
            return entry
        return replace(entry, launch=replace(entry.launch, slot_save_path=str(d)))

    # ------------------------------------------------------------------ save

    async def save(self, runner: Runner, config: Config) -> int:
        """Save every slot of `runner` that holds a prompt; bounded. How many were saved."""
        path = runner.entry.launch.slot_save_path
        restored = self._restored.pop(id(runner.worker), set())
        if not path or self.session is None or not runner.worker.ready:
            return 0
        limit = min(config.cache.save_timeout, config.timeouts.stop)
        deadline = time.monotonic() + limit
        busy = self._saving.setdefault(path, asyncio.Event())
        try:
            return await asyncio.wait_for(
                self._save_all(runner, Path(path), restored, config, deadline), limit)
        except asyncio.TimeoutError:
            log.warning("cache.save_abandoned", model=runner.name, after_s=limit)
            return 0
        except (aiohttp.ClientError, OSError, ValueError) as e:
            log.warning("cache.save_failed", model=runner.name, error=str(e))
            return 0
        finally:
            if self._saving.get(path) is busy:
                del self._saving[path]
            busy.set()

    async def _save_all(self, runner: Runner, d: Path, restored: set[int], config: Config,
                        deadline: float) -> int:
        # Requests in flight (a reload drains them): their slots are busy until they end.
        while runner.worker.inflight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        slots = await self._get(runner, "/slots")
        saved = 0
        for slot in slots if isinstance(slots, list) else []:
            sid = slot.get("id")
            if not isinstance(sid, int) or slot.get("is_processing"):
                continue
            n = slot.get("n_prompt_tokens")
            if "id_task" not in slot and sid in restored:
                # Restored at load and not used since: the file on disk is what it holds.
                with contextlib.suppress(OSError):
                    os.utime(d / f"slot-{sid}.bin")
                continue
            if not isinstance(n, int) or n <= 0:
                continue
            if await self._save_one(runner, d, sid):
                saved += 1
        if saved:
            await asyncio.to_thread(self.enforce_budget, config)
        return saved

    async def _get(self, runner: Runner, path: str) -> Any:
        assert self.session is not None
        async with self.session.get(runner.base_url + path, headers=runner.auth_headers) as r:
            return await r.json(content_type=None) if r.status == 200 else None

    async def _save_one(self, runner: Runner, d: Path, sid: int) -> bool:
        tmp = f"slot-{sid}.bin.tmp"
        assert self.session is not None
        log.info("cache.saving", model=runner.name, slot=sid, path=str(d / tmp))
        async with self.session.post(f"{runner.base_url}/slots/{sid}?action=save",
                                     json={"filename": tmp},
                                     headers=runner.auth_headers) as r:
            body = await r.json(content_type=None)
        if r.status != 200 or not isinstance(body, dict):
            log.warning("cache.save_failed", model=runner.name, slot=sid, status=r.status,
                        error=str(body)[:300])
            with contextlib.suppress(OSError):
                os.unlink(d / tmp)
            return False
        meta = await asyncio.to_thread(self._commit, d, sid, tmp, body)
        log.info("cache.saved", model=runner.name, slot=sid, tokens=meta["tokens"],
                 bytes=meta["bytes"], save_ms=body.get("timings", {}).get("save_ms"))
        return True

    @staticmethod
    def _commit(d: Path, sid: int, tmp: str, body: dict[str, Any]) -> dict[str, Any]:
        """fsync the engine's temp file, write its record, rename both into place."""
        src = d / tmp
        with open(src, "rb") as f:
            os.fsync(f.fileno())
        meta = {"slot": sid, "tokens": body.get("n_saved"), "bytes": src.stat().st_size,
                "digest": digest_file(src), "saved_at": time.time()}
        meta_tmp = d / f"slot-{sid}.json.tmp"
        with open(meta_tmp, "w") as f:
            json.dump(meta, f)
            f.flush()
            os.fsync(f.fileno())
        # The record goes first: a .bin without a matching record is never restored.
        with contextlib.suppress(OSError):
            os.unlink(d / f"slot-{sid}.bin")
        os.replace(meta_tmp, d / f"slot-{sid}.json")
        os.replace(src, d / f"slot-{sid}.bin")
        with contextlib.suppress(OSError):
            dfd = os.open(d, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        return meta

    # ------------------------------------------------------------------ restore

    async def restore(self, runner: Runner, config: Config) -> int:
        """Restore the saved slots into a worker that just became ready (before its first
        request). A file that fails its check or the engine's is deleted and logged."""
        path = runner.entry.launch.slot_save_path
        if not path or self.session is None:
            return 0
        d = Path(path)
        limit = config.cache.restore_timeout
        try:
            saving = self._saving.get(path)
            if saving is not None:  # the model's last engine is still saving
                await asyncio.wait_for(saving.wait(), min(limit, config.timeouts.stop))
            return await asyncio.wait_for(self._restore_all(runner, d), limit)
        except asyncio.TimeoutError:
            log.warning("cache.restore_abandoned", model=runner.name, after_s=limit)
        except (aiohttp.ClientError, OSError) as e:
            log.warning("cache.restore_failed", model=runner.name, error=str(e))
        except asyncio.CancelledError:
            await runner.worker.kill()  # the load was cancelled: its engine goes too
            raise
        if not runner.worker.alive:
            # The engine died restoring: nothing it was given is trusted again, and this
            # load failed (the next one starts without those files).
            for f in d.glob("slot-*.bin"):
                self._delete(d, int(f.name.split("-")[1].split(".")[0]), runner.name,
                             "the engine exited while restoring")
            raise WorkerLoadError(f"model {runner.name!r}: the engine exited while restoring "
                                  "its saved prompt cache (the files were deleted)")
        return len(self._restored.get(id(runner.worker), ()))

    async def _restore_all(self, runner: Runner, d: Path) -> int:
        done = self._restored.setdefault(id(runner.worker), set())
        for sid in range(runner.entry.launch.parallel):
            f = d / f"slot-{sid}.bin"
            if not f.exists():
                continue
            problem = await asyncio.to_thread(self._check, d, sid)
            if problem:
                self._delete(d, sid, runner.name, problem)
                continue
            assert self.session is not None
            async with self.session.post(f"{runner.base_url}/slots/{sid}?action=restore",
                                         json={"filename": f.name},
                                         headers=runner.auth_headers) as r:
                body = await r.json(content_type=None)
            if r.status != 200 or not isinstance(body, dict):
                self._delete(d, sid, runner.name, f"engine: {str(body)[:300]}")
                continue
            with contextlib.suppress(OSError):
                os.utime(f)
            done.add(sid)
            log.info("cache.restored", model=runner.name, slot=sid,
                     tokens=body.get("n_restored"),
                     restore_ms=body.get("timings", {}).get("restore_ms"))
        return len(done)

    @staticmethod
    def _check(d: Path, sid: int) -> str | None:
        """Why slot-N.bin must not be restored, or None when it matches its record."""
        try:
            meta = json.loads((d / f"slot-{sid}.json").read_text())
            size = (d / f"slot-{sid}.bin").stat().st_size
        except (OSError, ValueError) as e:
            return f"no valid record: {e}"
        if not isinstance(meta, dict) or meta.get("bytes") != size:
            return "size differs from its record"
        if meta.get("digest") != digest_file(d / f"slot-{sid}.bin"):
            return "digest differs from its record"
        return None

    @staticmethod
    def _delete(d: Path, sid: int, model: str, why: str) -> None:
        for name in (f"slot-{sid}.bin", f"slot-{sid}.json"):
            with contextlib.suppress(OSError):
                os.unlink(d / name)
        log.warning("cache.restore_failed", model=model, slot=sid, path=str(d), error=why,
                    deleted=True)

    # ------------------------------------------------------------------ disk

    @staticmethod
    def _sweep_tmp(d: Path) -> None:
        for f in d.glob("*.tmp"):
            with contextlib.suppress(OSError):
                f.unlink()

    def _files(self, config: Config) -> list[tuple[float, int, Path]]:
        out = []
        root = self.root(config)
        for f in root.glob("*/slot-*.bin"):
            with contextlib.suppress(OSError):
                st = f.stat()
                out.append((st.st_mtime, st.st_size, f))
        return out

    def enforce_budget(self, config: Config) -> list[Path]:
        """Remove the least recently used saved slots (all models) until under budget."""
        files = sorted(self._files(config), key=lambda t: t[0])
        total = sum(size for _, size, _ in files)
        removed = []
        for _, size, f in files:
            if total <= config.cache.disk_budget:
                break
            for p in (f, f.with_suffix(".json")):
                with contextlib.suppress(OSError):
                    p.unlink()
            total -= size
            removed.append(f)
            log.info("cache.evicted_file", path=str(f), bytes=size,
                     budget=config.cache.disk_budget)
        return removed

    def cached_bytes(self, config: Config) -> dict[str, int]:
        """Bytes of saved slots per model name (what /api/ps shows)."""
        out: dict[str, int] = {}
        root = self.root(config)
        for d in root.glob("*/model.json"):
            try:
                name = json.loads(d.read_text()).get("model")
            except (OSError, ValueError):
                continue
            if not isinstance(name, str):
                continue
            size = 0
            for f in d.parent.glob("slot-*.bin"):
                with contextlib.suppress(OSError):
                    size += f.stat().st_size
            out[name] = out.get(name, 0) + size
        return out
