"""`replicas: N` on a model: N local engines serve one name, each its own runner and memory
booking; requests spread over them (peers/router.py + replicas.choose), the listing shows the
name once and /api/ps every engine."""

from __future__ import annotations

import concurrent.futures
from pathlib import Path

import httpx
import pytest

from routerd.catalog import with_replicas
from routerd.config import ConfigError, parse_config
from routerd.workers.backends import build_argv
from tests.conftest import Daemon, fake_model


def test_a_model_with_replicas_is_its_copies_under_one_name() -> None:
    cfg = parse_config({"models": {"m": {"model": "/x.gguf", "replicas": 3, "aliases": ["a"],
                                         "backend": "llama-server"}}})
    assert cfg.models["m"].replicas == 3
    from routerd.catalog import entry_from_config

    main, *copies = with_replicas(entry_from_config(cfg.models["m"], store=None,
                                                    llama_server=None), 3)
    assert main.replicas == ("m#2", "m#3") and main.aliases == ("a",)
    assert [c.name for c in copies] == ["m#2", "m#3"]
    assert all(c.replica_of == "m" and not c.aliases and c.launch == main.launch for c in copies)
    # every copy's engine answers as the model (llama-server --alias m)
    argv = build_argv(copies[0].launch, host="127.0.0.1", port=1, api_key="k",
                      llama_server="/bin/true").argv
    assert argv[argv.index("--alias") + 1] == "m"
    with pytest.raises(ConfigError, match="replicas"):
        parse_config({"models": {"m": {"model": "/x.gguf", "replicas": 0}}})


def _chat(base: str, i: int) -> int:
    r = httpx.post(base + "/v1/chat/completions", timeout=60, json={
        "model": "slow", "messages": [{"role": "user", "content": f"hi {i}"}]})
    return r.status_code


def test_requests_spread_over_the_local_replicas(tmp_path: Path) -> None:
    d = Daemon({"models": {"slow": fake_model("--tokens", "10", "--token-delay", "0.05",
                                              replicas=2)}}, tmp_path)
    try:
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            codes = list(pool.map(lambda i: _chat(d.base_url, i), range(12)))
        assert codes == [200] * 12
        ps = {m["name"] for m in d.get("/api/ps")["models"]}
        assert ps == {"slow", "slow#2"}, ps  # two engines, each booked
        assert [m["name"] for m in d.get("/api/tags")["models"]] == ["slow"]
        assert [m["id"] for m in d.get("/v1/models")["data"]] == ["slow"]
        served = {}
        for name in ("slow", "slow#2"):
            log = httpx.get(d.base_url + "/api/logs", params={"model": name}, timeout=10).text
            served[name] = log.count("request POST /v1/chat/completions")
        assert all(n > 0 for n in served.values()) and sum(served.values()) == 12, served
    finally:
        assert d.stop() == 0


def test_two_real_engines_under_one_name(tmp_path: Path, model_path: Path) -> None:
    d = Daemon({"models": {"smollm2": {"model": str(model_path), "backend": "llama-server",
                                       "ctx_size": 512, "parallel": 1, "replicas": 2}}},
               tmp_path)
    try:
        def ask(i: int) -> tuple[int, str]:
            r = httpx.post(d.base_url + "/v1/completions", timeout=120, json={
                "model": "smollm2", "prompt": f"Count to {i}:", "max_tokens": 8})
            return r.status_code, r.json().get("model", "")
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(ask, range(12)))
        assert answers == [(200, "smollm2")] * 12
        assert {m["name"] for m in d.get("/api/ps")["models"]} == {"smollm2", "smollm2#2"}
        ram = [m["size"] for m in d.get("/api/ps")["models"]]
        assert all(size > 50 << 20 for size in ram), ram  # each engine booked on its own
    finally:
        assert d.stop() == 0
