"""Peers across real hosts: network namespaces on a test bridge (tests/netns.py). Host B
runs routerd serving SmolLM2, bound to B's address only; host A runs routerd with no model
and B as its peer; the test (in the root namespace) is the client of A. Skipped where
namespaces cannot be made (not root)."""

from __future__ import annotations

import json
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import BIN
from tests.netns import Host, network

OFF = {"discovery": {"ollama": False, "gpt4all": False, "lmstudio": False,
                     "huggingface": False, "llama_cpp": False}}
CLIENT_KEY, PEER_KEY = "client-key-a", "peer-key-b"
HI = [{"role": "user", "content": "Say hello."}]


def _serve(host: Host, work: Path, port: int, key: str, extra: dict[str, Any]
           ) -> subprocess.Popen[bytes]:
    work.mkdir(parents=True, exist_ok=True)
    (work / "keys").write_text(key + "\n")
    config = {**OFF, "host": host.addr, "port": port, "state_dir": str(work / "state"),
              "models_dir": str(work / "models"), "memory": {"ram_budget": "90%", "gpus": []},
              "auth": {"api_keys_file": str(work / "keys"), "exempt_loopback": False,
                       "metrics_public": True}, **extra}
    (work / "routerd.yaml").write_text(yaml.safe_dump(config))
    log = open(work / "routerd.log", "ab")
    proc = host.run([str(BIN / "routerd"), "serve", "--config", str(work / "routerd.yaml")],
                    stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert proc.poll() is None, (work / "routerd.log").read_text()[-3000:]
        try:
            with urllib.request.urlopen(f"http://{host.addr}:{port}/", timeout=1):
                return proc
        except OSError:
            time.sleep(0.05)
    raise TimeoutError((work / "routerd.log").read_text()[-3000:])


def _request(url: str, body: dict[str, Any] | None = None) -> Any:
    req = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json",
                                          "Authorization": f"Bearer {CLIENT_KEY}"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def test_host_a_serves_host_bs_model_across_the_veth_and_503s_once_b_is_gone(
        tmp_path: Path, model_path: Path) -> None:
    import ollama

    with network(2) as (a, b):
        b_proc = _serve(b, tmp_path / "b", 11434, PEER_KEY, {"models": {"smollm2": {
            "model": str(model_path), "backend": "llama-server", "ctx_size": 1024}}})
        _serve(a, tmp_path / "a", 11434, CLIENT_KEY, {"peers": [{
            "name": "b", "url": f"http://{b.addr}:11434", "api_key": PEER_KEY,
            "interval": "1s", "timeout": "2s"}]})
        base = f"http://{a.addr}:11434"
        deadline = time.monotonic() + 30
        tags: list[dict[str, Any]] = []
        while time.monotonic() < deadline and not tags:
            tags = [m for m in _request(base + "/api/tags")["models"] if m["name"] == "smollm2"]
            time.sleep(0.1)
        assert tags and tags[0]["routerd"]["host"] == f"http://{b.addr}:11434"
        before = b.veth_bytes()
        client = ollama.Client(host=base, headers={"Authorization": f"Bearer {CLIENT_KEY}"})
        parts = list(client.chat(model="smollm2", messages=HI, stream=True,
                                 options={"num_predict": 8}))
        assert parts[-1]["done"] and "".join(p["message"]["content"] for p in parts)
        after = b.veth_bytes()
        assert after[0] > before[0] and after[1] > before[1]  # it went through B's veth
        deadline = time.monotonic() + 10  # B's model shows as loaded after A's next poll
        while time.monotonic() < deadline:
            hosts_loaded = [m["routerd"]["host"] for m in _request(base + "/api/ps")["models"]]
            if hosts_loaded:
                break
            time.sleep(0.1)
        assert hosts_loaded == [f"http://{b.addr}:11434"]
        b_proc.send_signal(signal.SIGKILL)
        b_proc.wait(10)
        with pytest.raises(urllib.error.HTTPError) as e:
            for _ in range(2):  # the first may find the port gone itself, the next is refused
                _request(base + "/api/chat", {"model": "smollm2", "messages": HI,
                                              "stream": False})
        assert e.value.code == 503 and e.value.headers["Retry-After"]
