"""Runnable fakes for tests: a fake llama-server process and a llamafile builder.

``fake_worker_command(*flags)`` is the ``command:`` list a test puts in a model's config so
routerd launches the fake worker through its normal path (placeholders ``{host}``, ``{port}``
and ``{api_key}`` are substituted by routerd).
"""

from __future__ import annotations

import sys
from pathlib import Path

FAKE_WORKER = Path(__file__).with_name("fake_worker.py")


def fake_worker_command(*flags: str, api_key: bool = False) -> list[str]:
    """argv template for the fake worker; ``api_key=True`` adds ``--api-key {api_key}``."""
    argv = [sys.executable, str(FAKE_WORKER), "--host", "{host}", "--port", "{port}"]
    if api_key:
        argv += ["--api-key", "{api_key}"]
    return argv + list(flags)
