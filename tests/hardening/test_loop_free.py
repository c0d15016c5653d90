"""Finding 13: no file-sized work on the event loop. A verbose /api/show reads the whole GGUF
in a thread while the daemon keeps answering; unknown model names share one rescan, in a
thread, at most once per rescan_interval."""

from __future__ import annotations

import asyncio
import struct
import threading
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import aiohttp
import pytest
from aiohttp import web

from routerd import keys
from routerd.app import make_app
from routerd.catalog import ModelEntry
from routerd.config import parse_config
from routerd.workers.backends import LaunchSpec
from tests.conftest import Daemon, fake_model
from tests.fakes.gguf_model import write_sparse_gguf
from tests.hardening import ggufcraft as g
from tests.hardening.conftest import log_events

pytestmark = pytest.mark.timeout(120)
TOKENS = 30_000  # gguf.GGUFReader takes seconds over this many tokens


def big_vocabulary(path: Path, n: int = TOKENS) -> Path:
    toks = b"".join(g.s(f"tok{i}") for i in range(n))
    arr = g.s("tokenizer.ggml.tokens") + struct.pack("<IIQ", g.ARRAY, g.STRING, n) + toks
    path.write_bytes(g.header([*g.llama(block_count=2), g.kv_str("general.name", "big"), arr]))
    return path


async def test_verbose_show_leaves_the_loop_free(daemons: Callable[..., Daemon],
                                                 http: aiohttp.ClientSession,
                                                 tmp_path: Path) -> None:
    d = daemons({"big": fake_model(model=str(big_vocabulary(tmp_path / "big.gguf")))})

    async def show() -> Any:
        async with http.post(d.base_url + "/api/show",
                             json={"model": "big", "verbose": True}) as r:
            assert r.status == 200, await r.text()
            return await r.json()

    shows = [asyncio.ensure_future(show()) for _ in range(2)]
    # Until the daemon says the whole-file read began (or, on a blocked loop, show is over).
    for _ in range(1000):
        if log_events(d, "show.verbose_read") or all(s.done() for s in shows):
            break
        await asyncio.sleep(0.01)
    async with http.get(d.base_url + "/") as r:
        assert r.status == 200 and await r.text() == "Ollama is running"
    assert not all(s.done() for s in shows), "GET / was answered only after the verbose reads"
    for body in await asyncio.gather(*shows):
        assert len(body["model_info"]["tokenizer.ggml.tokens"]) == TOKENS
    async with http.post(d.base_url + "/api/show", json={"model": "big"}) as r:
        assert (await r.json())["model_info"]["tokenizer.ggml.tokens"] is None


class Counted:
    """The discovery source, counting its scans and the threads they ran on."""

    def __init__(self) -> None:
        self.entries: list[ModelEntry] = []
        self.threads: list[int] = []

    def __call__(self) -> list[ModelEntry]:
        self.threads.append(threading.get_ident())
        return list(self.entries)


@pytest.fixture
async def app_url(tmp_path: Path) -> AsyncIterator[tuple[web.Application, str, Counted]]:
    config = parse_config({"host": "127.0.0.1", "state_dir": str(tmp_path / "state"),
                           "models_dir": str(tmp_path / "models"),
                           "memory": {"ram_budget": "90%", "gpus": []},
                           "models": {"fake": fake_model()}})
    counted = Counted()
    app = make_app(config, discovery=counted)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield app, f"http://127.0.0.1:{runner.addresses[0][1]}", counted
    finally:
        await runner.cleanup()


async def test_unknown_names_share_one_rescan(app_url: tuple[web.Application, str, Counted],
                                              http: aiohttp.ClientSession,
                                              tmp_path: Path) -> None:
    app, url, counted = app_url
    at_start = len(counted.threads)

    async def ask(path: str, name: str) -> None:
        body: dict[str, Any] = {"model": name}
        if path != "/api/show":
            body["messages"] = [{"role": "user", "content": "hi"}]
        async with http.post(url + path, json=body) as r:
            assert r.status == 404, await r.text()
            err = (await r.json())["error"]
            assert (err if path.startswith("/api/") else err["message"]).startswith("model")

    await asyncio.gather(*(ask("/api/show", f"nope:{i}") for i in range(10)))  # at once
    for i in range(10):  # one after the other
        await ask("/api/show", f"library/nope{i}:latest")
        await ask("/api/chat", f"nope/chat{i}:x")
        await ask("/v1/chat/completions", f"nope/openai{i}:x")
    scans = counted.threads[at_start:]
    assert len(scans) <= 1, f"{len(scans)} rescans for 40 unknown names"
    assert threading.get_ident() not in scans, "a rescan ran on the event loop"

    # A model that appeared meanwhile is found by the next rescan the request waits for.
    catalog = app[keys.CATALOG]
    catalog.rescan_interval = 0
    tiny = write_sparse_gguf(tmp_path / "tiny.gguf", n_layer=2, n_embd=64, n_ff=128, n_head=4,
                             n_head_kv=2, n_vocab=1000, ctx=2048, name="Tiny")
    launch = LaunchSpec(model="local/new:q4_0", path=str(tiny), backend="llama-server")
    counted.entries.append(ModelEntry(name="local/new:q4_0", launch=launch,
                                      source="discovered:model_dirs", location=str(tiny)))
    async with http.post(url + "/api/show", json={"model": "local/new:q4_0"}) as r:
        assert r.status == 200, await r.text()
        assert (await r.json())["details"]["family"] == "llama"
    assert threading.get_ident() not in counted.threads[at_start:]
