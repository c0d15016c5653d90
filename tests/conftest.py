"""Shared fixtures: the real model, the built engines, and real routerd daemons on free ports."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
MODEL = Path(os.environ.get(
    "ROUTERD_TEST_MODEL",
    Path(os.environ.get("ROUTERD_CACHE", Path.home() / ".cache/routerd"))
    / "models/SmolLM2-135M-Instruct.Q4_1.gguf"))
LLAMA_SERVER = BIN / "llama-server"
FAKE_WORKER = ROOT / "tests/fakes/fake_worker.py"
MOON = "Who was the first man on the moon?"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fake_model(*flags: str, parallel: int = 1, **extra: Any) -> dict[str, Any]:
    """A config entry running the fake worker (tests/fakes) with the given fault flags."""
    return {"backend": "command", "parallel": parallel,
            "command": [sys.executable, str(FAKE_WORKER), "--host", "{host}", "--port", "{port}",
                        *flags], **extra}  # its key comes in $ROUTERD_WORKER_API_KEY


class Daemon:
    """A real `routerd serve` process on a free loopback port."""

    def __init__(self, config: dict[str, Any], workdir: Path, *, env: dict[str, str] | None = None,
                 port: int | None = None) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        config = {"host": "127.0.0.1", "state_dir": str(workdir / "state"),
                  "models_dir": str(workdir / "models"), **config}
        config.setdefault("memory", {"ram_budget": "90%", "gpus": []})
        self.port = port or free_port()
        config["port"] = self.port
        self.config_path = workdir / "routerd.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = workdir / "routerd.log"
        self.base_url = f"http://127.0.0.1:{self.port}"
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [str(BIN / "routerd"), "serve", "--config", str(self.config_path)],
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, "HOME": os.environ.get("HOME", "/root"), **(env or {})},
            start_new_session=True)
        self.wait_up()

    def wait_up(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"routerd exited {self.proc.returncode}: {self.log()}")
            try:
                with urllib.request.urlopen(self.base_url + "/", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.05)
        raise TimeoutError(f"routerd did not come up: {self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.base_url + path, timeout=30) as r:
            return json.loads(r.read())

    def post(self, path: str, body: dict[str, Any], timeout: float = 120) -> Any:
        req = urllib.request.Request(self.base_url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())

    def worker_pids(self) -> list[int]:
        return [m["routerd"]["pid"] for m in self.get("/api/ps")["models"]]

    def reload(self, config: dict[str, Any]) -> None:
        full = yaml.safe_load(self.config_path.read_text())
        full.update(config)
        self.config_path.write_text(yaml.safe_dump(full))
        self.proc.send_signal(signal.SIGHUP)

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode


@pytest.fixture(scope="session")
def model_path() -> Path:
    assert MODEL.is_file(), f"{MODEL} missing: run `make install`"
    return MODEL


@pytest.fixture(scope="session")
def llamafile_path(tmp_path_factory: pytest.TempPathFactory, model_path: Path) -> Path:
    from tests.fakes.llamafile import build_llamafile

    dest = tmp_path_factory.mktemp("llamafile") / "SmolLM2-135M-Instruct.llamafile"
    return build_llamafile(model_path, dest, llama_server=LLAMA_SERVER)


@pytest.fixture(scope="session")
def daemon(tmp_path_factory: pytest.TempPathFactory, model_path: Path,
           llamafile_path: Path) -> Iterator[Daemon]:
    """One routerd for the whole session serving SmolLM2 on all three backends."""
    work = tmp_path_factory.mktemp("daemon")
    common = {"ctx_size": 2048, "keep_alive": "10m"}
    d = Daemon({
        "default_model": "smollm2",
        "keep_alive": "10m",
        "models": {
            "smollm2": {"model": str(model_path), "backend": "llama-server", "parallel": 2,
                        "aliases": ["smol"], **common},
            "smollm2-lcp": {"model": str(model_path), "backend": "llama-cpp-python", **common},
            "smollm2-lf": {"model": str(llamafile_path), "backend": "llamafile", **common},
        },
    }, work)
    yield d
    assert d.stop() == 0, d.log()
