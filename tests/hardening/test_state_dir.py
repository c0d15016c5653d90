"""Finding 15: a state_dir that cannot be written (full disk, a file where the folder should
be) costs bookkeeping, never an answer; a log line says what failed."""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path
from typing import Callable, Iterator

import aiohttp
import pytest

from routerd.scheduler.memory import MeasureKey, MeasurementBook
from tests.conftest import Daemon, fake_model
from tests.fakes.gguf_model import write_sparse_gguf
from tests.hardening.conftest import log_events

pytestmark = pytest.mark.timeout(120)


async def test_unwritable_state_dir_answers(daemons: Callable[..., Daemon],
                                            http: aiohttp.ClientSession, tmp_path: Path) -> None:
    blocked = tmp_path / "state-is-a-file"
    blocked.write_text("not a folder\n")  # every write under it fails (ENOTDIR)
    gguf = write_sparse_gguf(tmp_path / "tiny.gguf", n_layer=2, n_embd=64, n_ff=128, n_head=4,
                             n_head_kv=2, n_vocab=1000, ctx=2048, name="Tiny")
    # a model file, so the load is measured and filed in the measurements book
    d = daemons({"fake": fake_model(model=str(gguf))}, state_dir=str(blocked))
    for _ in range(2):  # the load (measured, booked) and a second request on the loaded engine
        async with http.post(d.base_url + "/api/generate",
                             json={"model": "fake", "prompt": "hi", "stream": False}) as r:
            assert r.status == 200, await r.text()
            assert (await r.json())["done"] is True
    failed = log_events(d, "memory.book_write_failed")
    assert failed, d.log()
    assert str(blocked / "measurements.json") in failed[0]["path"]
    assert failed[0]["error"]
    async with http.get(d.base_url + "/api/ps") as r:
        assert r.status == 200
        [model] = (await r.json())["models"]
        assert model["routerd"]["measured"]  # kept in memory, booked all the same


@pytest.fixture
def full_disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs filled to the last byte, with an empty state folder on it (root only)."""
    mnt = tmp_path / "full"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)],
            capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root (the state-is-a-file test covers the rest)")
    try:
        (mnt / "state").mkdir()
        fd = os.open(mnt / "filler", os.O_WRONLY | os.O_CREAT)
        try:
            while True:
                os.write(fd, b"\0" * 4096)
        except OSError as e:
            assert e.errno == errno.ENOSPC
        finally:
            os.close(fd)
        yield mnt / "state"
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


async def test_full_state_dir_answers(daemons: Callable[..., Daemon], http: aiohttp.ClientSession,
                                      tmp_path: Path, full_disk: Path) -> None:
    gguf = write_sparse_gguf(tmp_path / "tiny.gguf", n_layer=2, n_embd=64, n_ff=128, n_head=4,
                             n_head_kv=2, n_vocab=1000, ctx=2048, name="Tiny")
    d = daemons({"fake": fake_model(model=str(gguf))}, state_dir=str(full_disk))
    async with http.post(d.base_url + "/api/generate",
                         json={"model": "fake", "prompt": "hi", "stream": False}) as r:
        assert r.status == 200, await r.text()
    failed = log_events(d, "memory.book_write_failed")
    assert failed and "No space left on device" in failed[0]["error"], d.log()


def test_book_keeps_figures_when_it_cannot_save(tmp_path: Path) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("x")
    book = MeasurementBook(blocked / "measurements.json")
    key = MeasureKey("/m.gguf", 1, 2, ctx=4096, parallel=1, backend="llama-server")
    book.record(key, 100, 90)  # no exception
    assert book.measured(key) == 100
    book.record(key, 120, 90)
    assert book.measured(key) == 120
    assert not list(tmp_path.glob("**/.memory-*"))  # no temporary left behind


async def test_unwritable_state_dir_keeps_responses_answers(daemons: Callable[..., Daemon],
                                                            http: aiohttp.ClientSession,
                                                            tmp_path: Path) -> None:
    blocked = tmp_path / "state-is-a-file"
    blocked.write_text("not a folder\n")
    d = daemons({"fake": fake_model()}, state_dir=str(blocked))
    async with http.post(d.base_url + "/v1/responses",
                         json={"model": "fake", "input": "hi"}) as r:  # store defaults to true
        assert r.status == 200, await r.text()
        assert (await r.json())["object"] == "response"
