"""Finding 12: a GGUF header is checked against its file's size and sane bounds before
anything is allocated for it; a 192-byte file claiming 4e7 layers is a 400, not 610 MiB."""

from __future__ import annotations

import hashlib
import struct
import tracemalloc
from pathlib import Path
from typing import Any, Callable

import aiohttp
import psutil
import pytest

from routerd.store import gguf
from tests.conftest import Daemon
from tests.fakes.gguf_model import write_sparse_gguf
from tests.hardening import ggufcraft as g

pytestmark = pytest.mark.timeout(120)
MiB = 1 << 20


async def upload(http: aiohttp.ClientSession, d: Daemon, data: bytes) -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    async with http.post(f"{d.base_url}/api/blobs/{digest}", data=data) as r:
        assert r.status in (200, 201), await r.text()
    return digest


async def create(http: aiohttp.ClientSession, d: Daemon, name: str,
                 digest: str) -> tuple[int, Any]:
    body = {"model": name, "files": {f"{name}.gguf": digest}, "stream": False}
    async with http.post(d.base_url + "/api/create", json=body) as r:
        return r.status, await r.json()


async def test_block_count_bomb_is_refused(daemons: Callable[..., Daemon],
                                          http: aiohttp.ClientSession, tmp_path: Path) -> None:
    d = daemons({})
    proc = psutil.Process(d.proc.pid)
    # A good model first: what the create path imports and caches on first use is paid here.
    tiny = write_sparse_gguf(tmp_path / "tiny.gguf", n_layer=2, n_embd=64, n_ff=128, n_head=4,
                             n_head_kv=2, n_vocab=1000, ctx=2048, name="Tiny").read_bytes()
    status, body = await create(http, d, "tiny", await upload(http, d, tiny))
    assert status == 200, body
    before = proc.memory_info().rss

    bomb = g.block_count_bomb()
    assert len(bomb) == 192
    status, body = await create(http, d, "bomb", await upload(http, d, bomb))
    grown = proc.memory_info().rss - before
    assert status == 400, body
    assert set(body) == {"error"} and "GGUF" in body["error"], body
    assert grown < 8 * MiB, f"RSS grew {grown / MiB:.1f} MiB"
    async with http.get(d.base_url + "/api/tags") as r:
        names = {m["name"] for m in (await r.json())["models"]}
    assert "tiny:latest" in names and not any(n.startswith("bomb") for n in names)
    assert d.proc.poll() is None


# ------------------------------------------------------------------ the reader's bounds

def rejected(tmp_path: Path, data: bytes, match: str) -> None:
    """read_gguf refuses the file with `match` in the message, and allocates under 1 MiB."""
    path = tmp_path / "x.gguf"
    path.write_bytes(data)
    tracemalloc.start()
    try:
        with pytest.raises(gguf.GGUFError, match=match):
            gguf.read_gguf(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < MiB, f"{peak} bytes allocated before the refusal"


BOUNDS: dict[str, tuple[bytes, str]] = {
    "block_count": (g.block_count_bomb(), "block_count"),
    "block_count 1.5e9": (g.block_count_bomb(1_500_000_000), "block_count"),
    "embedding_length": (g.header(g.llama(block_count=2, embedding_length=1 << 31)),
                         "embedding_length"),
    "head_count": (g.header(g.llama(block_count=2, attention__head_count=1 << 30)),
                   "head_count"),
    "head_count_kv": (g.header(g.llama(block_count=2, attention__head_count_kv=1 << 30)),
                      "head_count_kv"),
    "key_length": (g.header(g.llama(block_count=2, attention__key_length=1 << 30)),
                   "key_length"),
    "feed_forward_length": (g.header(g.llama(block_count=2, feed_forward_length=1 << 31)),
                            "feed_forward_length"),
    "vocab_size": (g.header(g.llama(vocab_size=1 << 31)), "vocab_size"),
    "kv count": (g.header(g.llama(), n_kv=1 << 19), "keys"),
    "tensor count": (g.header(g.llama(), n_tensors=1 << 23), "tensors"),
    "tensor count vs size": (g.header(g.llama(), n_tensors=5000), "tensors"),
    "string length": (g.header([g.s("general.name") + struct.pack("<IQ", g.STRING, 1 << 40)]),
                      "string"),
    "array length": (g.header([g.s("x.arr") + struct.pack("<IIQ", g.ARRAY, g.UINT64, 1 << 40)]),
                     "array"),
    "string array length": (g.header([g.s("x.arr") + struct.pack("<IIQ", g.ARRAY, g.STRING,
                                                                 1 << 40)]), "array"),
    "nested array": (g.header([g.s("x.arr") + struct.pack("<IIQ", g.ARRAY, g.ARRAY, 4)]),
                     "array"),
    "key length": (g.header([g.s("k" * 70_000) + struct.pack("<II", g.UINT32, 1)]), "key"),
    "tensor dims": (g.header(g.llama(block_count=1), n_tensors=1, tensors=(
        g.s("blk.0.w") + struct.pack("<I", 4) + struct.pack("<4Q", *[1 << 62] * 4)
        + struct.pack("<IQ", 0, 0))), "elements"),
}


@pytest.mark.parametrize("case", list(BOUNDS))
def test_reader_bounds(tmp_path: Path, case: str) -> None:
    data, match = BOUNDS[case]
    rejected(tmp_path, data, match)


def test_header_cache_refuses_too(tmp_path: Path) -> None:
    path = tmp_path / "bomb.gguf"
    path.write_bytes(g.block_count_bomb())
    with pytest.raises(gguf.GGUFError, match="block_count"):
        gguf.header(path)


def test_sane_headers_still_read(tmp_path: Path) -> None:
    ok = g.header(g.llama(block_count=80, embedding_length=8192, attention__head_count=64,
                          attention__head_count_kv=8, context_length=1 << 20,
                          vocab_size=262_144, feed_forward_length=28_672))
    path = tmp_path / "ok.gguf"
    path.write_bytes(ok)
    info = gguf.read_gguf(path)
    assert (info.n_layer, info.n_embd, info.n_head_kv, info.context_length) == (
        80, 8192, 8, 1 << 20)
    assert len(info.layer_bytes) == 80
