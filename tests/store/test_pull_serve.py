"""End to end through the full app: pull from a registry, then chat with the pulled model;
a model in an Ollama-layout store (read-only) is served without pulling."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import AsyncIterator

import ollama
import pytest
from aiohttp import web

from routerd.app import make_app
from routerd.config import parse_config
from tests.fakes.registry import FakeRegistry

pytestmark = [pytest.mark.timeout(300), pytest.mark.engine]
MODEL = Path(os.environ.get("ROUTERD_TEST_MODEL",
                            Path.home() / ".cache/routerd/models/SmolLM2-135M-Instruct.Q4_1.gguf"))
LLAMA_SERVER = Path(sys.executable).parent / "llama-server"
OPTS = {"temperature": 0, "num_predict": 16, "seed": 1}
MOON = "Who was the first man on the moon?"


def ollama_store(root: Path) -> None:
    """~/.ollama/models as Ollama writes it: tiny:latest with the real GGUF (hard link)."""
    blobs = root / "blobs"
    blobs.mkdir(parents=True)
    digest = hashlib.sha256(MODEL.read_bytes()).hexdigest()
    try:
        os.link(MODEL, blobs / f"sha256-{digest}")
    except OSError:
        shutil.copyfile(MODEL, blobs / f"sha256-{digest}")
    cfg = json.dumps({"model_format": "gguf", "model_family": "llama",
                      "model_families": ["llama"], "model_type": "134.52M",
                      "file_type": "Q4_1"}).encode()
    cd = hashlib.sha256(cfg).hexdigest()
    (blobs / f"sha256-{cd}").write_bytes(cfg)
    manifest = root / "manifests/registry.ollama.ai/library/tiny/latest"
    manifest.parent.mkdir(parents=True)
    manifest.write_text(json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json",
                   "digest": f"sha256:{cd}", "size": len(cfg)},
        "layers": [{"mediaType": "application/vnd.ollama.image.model",
                    "digest": f"sha256:{digest}", "size": MODEL.stat().st_size}]}))
    os.chmod(manifest, 0o444)


@pytest.fixture
async def routerd_url(tmp_path: Path) -> AsyncIterator[str]:
    if not LLAMA_SERVER.exists() or not MODEL.is_file():
        pytest.skip("needs the built llama-server and the SmolLM2 model (make install)")
    ollama_store(tmp_path / "ollama")
    config = parse_config({
        "host": "127.0.0.1", "port": 0, "models_dir": str(tmp_path / "models"),
        "ollama_models_dir": str(tmp_path / "ollama"), "state_dir": str(tmp_path / "state"),
        "keep_alive": "1m", "memory": {"ram_budget": "90%", "gpus": []},
    })
    runner = web.AppRunner(make_app(config), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


async def test_pull_then_chat(routerd_url: str) -> None:
    client = ollama.Client(host=routerd_url, timeout=180)
    async with FakeRegistry() as reg:
        reg.add_smollm2(MODEL)
        name = f"{reg.host}/library/smollm2:latest"
        events = await asyncio.to_thread(lambda: list(client.pull(name, insecure=True,
                                                                   stream=True)))
        assert events[-1].status == "success"
    tags = await asyncio.to_thread(client.list)
    assert name in [m.model for m in tags.models]
    r = await asyncio.to_thread(lambda: client.chat(
        model=name, messages=[{"role": "user", "content": MOON}], options=OPTS))
    assert r.done and r.message.content.strip()
    print(f"\npulled {name}, chat answered: {r.message.content.strip()[:80]!r}")


async def test_ollama_store_is_served_read_only(routerd_url: str) -> None:
    client = ollama.Client(host=routerd_url, timeout=180)
    tags = await asyncio.to_thread(client.list)
    assert "tiny:latest" in [m.model for m in tags.models]
    r = await asyncio.to_thread(lambda: client.chat(
        model="tiny", messages=[{"role": "user", "content": MOON}], options=OPTS))
    assert r.done and r.message.content.strip()
    with pytest.raises(ollama.ResponseError) as e:
        await asyncio.to_thread(client.delete, "tiny")
    assert e.value.status_code == 403
