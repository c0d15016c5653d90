"""Swap-aware scheduling through a live daemon: two fake models, room for one (max_loaded 1),
8 clients (4 per model) for a bounded number of requests. Every request is answered (none
waits out timeouts.load into an error), and swaps stay within min_resident's bound (an upper
bound a slow machine only makes easier: counts, not timings)."""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from typing import Any

import pytest

from tests.conftest import Daemon, fake_model

pytestmark = pytest.mark.timeout(120)
MIN_RESIDENT = 1.0


def loads(d: Daemon) -> int:
    with urllib.request.urlopen(d.base_url + "/metrics", timeout=30) as r:
        text = r.read().decode()
    return int(sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("routerd_model_loads_total{")))


def test_two_models_room_for_one_eight_clients(tmp_path: Any) -> None:
    model = fake_model("--slow-start", "0.2", "--tokens", "4", "--token-delay", "0.01",
                       parallel=2)
    d = Daemon({"models": {"a": model, "b": model}, "max_loaded": 1, "swap_batch": 4,
                "min_resident": f"{MIN_RESIDENT}s", "timeouts": {"load": "60s"}}, tmp_path)
    try:
        statuses: list[int] = []
        lock = threading.Lock()

        def client(model: str) -> None:
            for _ in range(8):
                body = {"model": model, "max_tokens": 4,
                        "messages": [{"role": "user", "content": "hi"}]}
                req = urllib.request.Request(d.base_url + "/v1/chat/completions",
                                             data=json.dumps(body).encode(),
                                             headers={"Content-Type": "application/json"})
                try:
                    with urllib.request.urlopen(req, timeout=90) as r:
                        r.read()
                        status = r.status
                except urllib.error.HTTPError as e:
                    status = e.code
                with lock:
                    statuses.append(status)

        t0 = time.monotonic()
        threads = [threading.Thread(target=client, args=("ab"[i % 2],)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(100)
        elapsed = time.monotonic() - t0
        assert statuses == [200] * 64, d.log()
        swaps = loads(d) - 1
        assert 1 <= swaps <= elapsed / MIN_RESIDENT + 2, (swaps, elapsed)
        ps = d.get("/api/ps")["models"]
        assert len(ps) == 1  # room for one
    finally:
        assert d.stop() == 0, d.log()
