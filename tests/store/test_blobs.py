"""Blobs: atomic writes, verified uploads, resumable parallel downloads (in-memory source)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import AsyncGenerator

import aiohttp
import pytest

from routerd.errors import BadRequest
from routerd.store.blobs import (BlobDownload, DigestMismatch, DownloadError, DownloadPolicy,
                                 StorageFull, atomic_write, plan_parts, receive_blob)

pytestmark = pytest.mark.timeout(60)
DATA = os.urandom(3 * 1024 * 1024 + 12345)
HEX = hashlib.sha256(DATA).hexdigest()
FAST = DownloadPolicy(part_size=512 * 1024, concurrency=3, max_attempts=3, backoff=0.001,
                      flush_interval=0.01, buffer_size=64 * 1024)


class MemSource:
    """Range reads from memory; ``budget`` bytes are served in total, then every read fails
    (``once``: only the first read past the budget fails)."""

    ranges = True

    def __init__(self, data: bytes, *, budget: int | None = None, once: bool = False,
                 chunk: int = 32 * 1024) -> None:
        self.data, self.budget, self.once, self.chunk = data, budget, once, chunk
        self.served = 0
        self.requests: list[tuple[int, int]] = []

    async def stream(self, start: int, end: int) -> AsyncGenerator[bytes, None]:
        self.requests.append((start, end))
        pos = start
        while pos < end:
            n = min(self.chunk, end - pos)
            if self.budget is not None and self.served + n > self.budget:
                if self.once:
                    self.budget = None
                raise aiohttp.ClientPayloadError("connection cut (test)")
            self.served += n
            yield self.data[pos:pos + n]
            pos += n
            await asyncio.sleep(0)


def _download(tmp: Path, source: MemSource, *, want: str | None = HEX,
              policy: DownloadPolicy = FAST) -> BlobDownload:
    blobs = tmp / "blobs"
    return BlobDownload(blobs / f"sha256-{HEX}-partial", len(DATA), source, policy,
                        key=f"sha256:{HEX}", want=want, final_for=lambda h: blobs / f"sha256-{h}")


def test_plan_parts_cover_the_blob() -> None:
    for total in (1, 511, 512 * 1024, 10**7 + 3):
        parts = plan_parts(total, FAST)
        assert parts[0].offset == 0 and sum(p.size for p in parts) == total
        assert all(a.offset + a.size == b.offset for a, b in zip(parts, parts[1:]))
        assert len(parts) <= FAST.max_parts
    assert plan_parts(0, FAST) == []


async def test_download_verifies_and_renames(tmp_path: Path) -> None:
    src = MemSource(DATA)
    digest = await _download(tmp_path, src).run()
    assert digest == HEX
    assert (tmp_path / f"blobs/sha256-{HEX}").read_bytes() == DATA
    assert sorted(p.name for p in (tmp_path / "blobs").iterdir()) == [f"sha256-{HEX}"]
    assert len(src.requests) == len(plan_parts(len(DATA), FAST)) > 1
    assert src.served == len(DATA)


async def test_mismatch_keeps_nothing(tmp_path: Path) -> None:
    wrong = "0" * 64
    with pytest.raises(DigestMismatch) as e:
        await _download(tmp_path, MemSource(DATA), want=wrong).run()
    assert e.value.message == (f"digest mismatch, file must be downloaded again: "
                               f"want sha256:{wrong}, got sha256:{HEX}")
    assert list((tmp_path / "blobs").iterdir()) == []


async def test_resume_after_failure_fetches_only_the_rest(tmp_path: Path) -> None:
    cut = int(len(DATA) * 0.4)
    first = _download(tmp_path, MemSource(DATA, budget=cut),
                      policy=DownloadPolicy(**{**FAST.__dict__, "max_attempts": 1}))
    with pytest.raises(DownloadError):
        await first.run()
    sidecar = tmp_path / f"blobs/sha256-{HEX}-partial.json"
    state = json.loads(sidecar.read_text())
    persisted = sum(c for _, _, c in state["parts"])
    assert 0 < persisted <= cut
    assert not (tmp_path / f"blobs/sha256-{HEX}").exists()

    again = MemSource(DATA)
    second = _download(tmp_path, again)  # a new object: as after a restart
    assert await second.run() == HEX
    assert second.resumed_from == persisted
    assert again.served == len(DATA) - persisted
    assert not sidecar.exists()


async def test_cut_part_is_retried_in_the_same_run(tmp_path: Path) -> None:
    src = MemSource(DATA, budget=len(DATA) // 2, once=True)
    assert await _download(tmp_path, src).run() == HEX
    assert src.served == len(DATA)  # the retry resumed at the byte where the part stopped


async def test_attempts_are_bounded(tmp_path: Path) -> None:
    src = MemSource(DATA, budget=0)
    with pytest.raises(DownloadError, match="giving up after 3 attempts"):
        await _download(tmp_path, src, policy=DownloadPolicy(
            **{**FAST.__dict__, "part_size": len(DATA), "concurrency": 1})).run()
    assert len(src.requests) == 3


async def test_cancel_keeps_a_resumable_partial(tmp_path: Path) -> None:
    class Slow(MemSource):
        async def stream(self, start: int, end: int) -> AsyncGenerator[bytes, None]:
            async for chunk in super().stream(start, end):
                yield chunk
                if self.served > len(DATA) // 3:
                    await asyncio.Event().wait()  # hang until cancelled

    dl = _download(tmp_path, Slow(DATA))
    task = asyncio.create_task(dl.run())
    while dl.completed < len(DATA) // 4:
        await asyncio.sleep(0.005)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    state = json.loads((tmp_path / f"blobs/sha256-{HEX}-partial.json").read_text())
    done = sum(c for _, _, c in state["parts"])
    assert done >= len(DATA) // 4
    src = MemSource(DATA)
    assert await _download(tmp_path, src).run() == HEX
    assert src.served == len(DATA) - done


async def _chunks(data: bytes) -> AsyncGenerator[bytes, None]:
    for i in range(0, len(data), 100_000):
        yield data[i:i + 100_000]


async def test_upload_is_verified(tmp_path: Path) -> None:
    blobs = tmp_path / "blobs"
    with pytest.raises(BadRequest, match="digest mismatch"):
        await receive_blob(blobs, "1" * 64, _chunks(DATA))
    assert list(blobs.iterdir()) == []
    assert await receive_blob(blobs, HEX, _chunks(DATA)) is True
    assert await receive_blob(blobs, HEX, _chunks(b"ignored")) is False
    assert (blobs / f"sha256-{HEX}").read_bytes() == DATA


def test_atomic_write_replaces(tmp_path: Path) -> None:
    p = tmp_path / "a/b/c"
    atomic_write(p, b"one")
    atomic_write(p, b"two")
    assert p.read_bytes() == b"two" and os.listdir(p.parent) == ["c"]


_ENOSPC_SCRIPT = textwrap.dedent("""
    import asyncio, json, os, sys
    from pathlib import Path
    sys.path[:0] = [sys.argv[2]]
    from tests.store.test_blobs import MemSource, _download, DATA
    from routerd.store.blobs import StorageFull
    root = Path(sys.argv[1])
    try:
        asyncio.run(_download(root, MemSource(DATA)).run())
        print(json.dumps({"error": None}))
    except StorageFull as e:
        print(json.dumps({"error": e.message, "left": sorted(os.listdir(root / "blobs"))}))
""")


def test_disk_full_aborts_cleanly(tmp_path: Path) -> None:
    """A real ENOSPC: a 1 MiB tmpfs in a private mount namespace (needs root + unshare)."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and unshare to mount a tiny tmpfs")
    mnt = tmp_path / "small"
    mnt.mkdir()
    root = Path(__file__).resolve().parents[2]
    cmd = (f"mount -t tmpfs -o size=1m tmpfs {mnt} && exec {sys.executable} -c "
           f"'{_ENOSPC_SCRIPT}' {mnt} {root}")
    r = subprocess.run(["unshare", "-m", "sh", "-c", cmd], capture_output=True, text=True,
                       timeout=60)
    if r.returncode != 0 and "mount" in r.stderr:
        pytest.skip(f"cannot mount tmpfs here: {r.stderr.strip()[:200]}")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["error"] and "no space left" in out["error"]
    assert out["left"] == []  # no partial, no sidecar, no blob
    assert StorageFull.status == 507
