"""A real daemon per test (fake workers unless a test says otherwise) and an HTTP session."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterator

import aiohttp
import pytest

from tests.conftest import Daemon

FAST = {"probe_interval": "0.5s", "probe_timeout": "2s", "stop": "2s", "drain": "5s",
        "load": "60s"}


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    made: list[Daemon] = []

    def start(models: dict[str, Any], **extra: Any) -> Daemon:
        config = {"keep_alive": "10m", "timeouts": FAST, "models": models,
                  "discovery": {"gpt4all": False, "lmstudio": False, "huggingface": False,
                                "llama_cpp": False, "ollama": False}, **extra}
        d = Daemon(config, tmp_path / f"daemon{len(made)}")
        made.append(d)
        return d

    yield start
    for d in made:
        d.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as s:
        yield s


def log_events(d: Daemon, event: str) -> list[dict[str, Any]]:
    """The daemon's structured log lines for one event."""
    out = []
    for line in d.log_path.read_text(errors="replace").splitlines():
        if line.startswith("{") and f'"{event}"' in line:
            obj = json.loads(line)
            if obj.get("event") == event:
                out.append(obj)
    return out
