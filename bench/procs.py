"""The peers as processes: direct llama-server, llama-server's router mode, routerd, and the
fake worker. Every one on a free loopback port, in its own process group, stopped for sure."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import yaml

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
FAKE_WORKER = ROOT / "tests/fakes/fake_worker.py"
DEFAULT_MODEL = Path(os.environ.get(
    "ROUTERD_TEST_MODEL",
    Path.home() / ".cache/routerd/models/SmolLM2-135M-Instruct.Q4_1.gguf"))
# The per-model engine settings every peer gets (routerd's: ctx_size, parallel).
CTX_SIZE, PARALLEL = 2048, 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Proc:
    """One started process (a process-group leader) and where it answers."""

    name: str
    popen: subprocess.Popen[bytes]
    base_url: str
    log_path: Path
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def rss(self) -> int:
        return int(psutil.Process(self.pid).memory_info().rss)

    def cpu_seconds(self) -> float:
        t = psutil.Process(self.pid).cpu_times()
        return float(t.user + t.system)

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self, timeout: float = 15.0) -> None:
        if self.popen.poll() is None:
            _signal_group(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        _signal_group(self.pid, signal.SIGKILL)  # whatever it left in its group
        if self.popen.poll() is None:
            self.popen.wait(10)


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


_STARTED: list[Proc] = []


def stop_everything() -> None:
    """Stop whatever this run started and is still running (on any way out)."""
    while _STARTED:
        proc = _STARTED.pop()
        try:
            proc.stop(timeout=5)
        except (OSError, subprocess.SubprocessError):
            pass


def spawn(name: str, argv: list[str], workdir: Path, port: int, *,
          headers: dict[str, str] | None = None, env: dict[str, str] | None = None) -> Proc:
    log_path = workdir / f"{name}.log"
    with open(log_path, "ab") as log:
        popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                 stderr=subprocess.STDOUT, start_new_session=True,
                                 env={**os.environ, **env} if env else None)
    proc = Proc(name, popen, f"http://127.0.0.1:{port}", log_path, headers or {})
    _STARTED.append(proc)
    return proc


def wait_http(proc: Proc, path: str, *, timeout: float = 60.0, every: float = 0.01) -> float:
    """Poll `path` until it answers 200; return the seconds it took."""
    t0 = time.monotonic()
    deadline = t0 + timeout
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.name} exited {proc.popen.returncode}: {proc.log_tail()}")
        try:
            with urllib.request.urlopen(proc.base_url + path, timeout=2) as r:
                if r.status == 200:
                    return time.monotonic() - t0
        except (OSError, urllib.error.URLError):
            pass
        time.sleep(every)
    raise TimeoutError(f"{proc.name} not ready within {timeout}s: {proc.log_tail()}")


# ------------------------------------------------------------------ engine flags


def routerd_launch(model: Path, *, port: int, api_key: str, alias: str) -> Any:
    """The exact Argv (argv and environment) routerd builds for a `backend: llama-server`
    model with our settings."""
    from routerd.workers.backends import LaunchSpec, build_argv

    spec = LaunchSpec(model=alias, path=str(model), backend="llama-server", ctx_size=CTX_SIZE,
                      parallel=PARALLEL, gpu_layers=None, embeddings=True)
    return build_argv(spec, host="127.0.0.1", port=port, api_key=api_key,
                      llama_server=str(BIN / "llama-server"))


def routerd_argv(model: Path, *, port: int, api_key: str, alias: str) -> list[str]:
    argv: list[str] = routerd_launch(model, port=port, api_key=api_key, alias=alias).argv
    return argv


def shared_flags(model: Path) -> list[str]:
    """routerd's flags minus what is per process (model, host, port, key, alias): what router
    mode gets for every model."""
    argv = routerd_argv(model, port=1, api_key="k", alias="a")[1:]
    out, skip = [], {"-m", "--host", "--port", "--api-key", "--alias"}
    i = 0
    while i < len(argv):
        if argv[i] in skip:
            i += 2
            continue
        out.append(argv[i])
        i += 1
    return out


def start_direct(workdir: Path, model: Path, *, name: str = "direct") -> Proc:
    port, key = free_port(), "bench-direct-key"
    launch = routerd_launch(model, port=port, api_key=key, alias="smol-a")
    proc = spawn(name, launch.argv, workdir, port, env=launch.env,
                 headers={"Authorization": f"Bearer {key}"})
    wait_http(proc, "/health")
    return proc


def start_router_mode(workdir: Path, model: Path, models_max: int = 1) -> Proc:
    """llama-server --models-dir with two names for the same GGUF (smol-a, smol-b)."""
    mdir = workdir / "router-models"
    mdir.mkdir(exist_ok=True)
    for name in ("smol-a", "smol-b"):
        link = mdir / f"{name}.gguf"
        if not link.exists():
            link.symlink_to(model)
    port = free_port()
    argv = [str(BIN / "llama-server"), "--models-dir", str(mdir), "--models-max",
            str(models_max), "--host", "127.0.0.1", "--port", str(port), *shared_flags(model)]
    proc = spawn("router-mode", argv, workdir, port)
    wait_http(proc, "/health")
    return proc


def router_status(proc: Proc, model: str) -> str:
    with urllib.request.urlopen(proc.base_url + "/models", timeout=10) as r:
        data = json.loads(r.read())
    for m in data.get("data", []):
        if m.get("id") == model:
            return str(m.get("status", {}).get("value", "?"))
    return "missing"


def router_child_args(proc: Proc, model: str) -> list[str]:
    with urllib.request.urlopen(proc.base_url + "/models", timeout=10) as r:
        data = json.loads(r.read())
    for m in data.get("data", []):
        if m.get("id") == model:
            return [str(a) for a in m.get("status", {}).get("args", [])]
    return []


def routerd_command(config: Path, src: str | None) -> list[str]:
    """`routerd serve`, installed, or from the source tree `src` (`--ab`: A/B a change)."""
    if src is None:
        return [str(BIN / "routerd"), "serve", "--config", str(config)]
    # sys.path[0] is the working directory under -c: put the tree in front of it.
    code = (f"import sys; sys.path[:0] = {src!r}.split(':'); "
            "from routerd.cli import main; sys.exit(main(sys.argv[1:]))")
    return [sys.executable, "-c", code, "serve", "--config", str(config)]


def start_routerd(workdir: Path, config: dict[str, Any], name: str = "routerd",
                  src: str | None = None) -> Proc:
    workdir = workdir / name
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    full = {"host": "127.0.0.1", "port": port, "state_dir": str(workdir / "state"),
            "models_dir": str(workdir / "models"), "memory": {"gpus": []},
            "discovery": {k: False for k in
                          ("ollama", "gpt4all", "lmstudio", "huggingface", "llama_cpp")},
            **config}
    path = workdir / "routerd.yaml"
    path.write_text(yaml.safe_dump(full))
    proc = spawn(name, routerd_command(path, src), workdir, port)
    wait_http(proc, "/", every=0.05)
    return proc


def real_models_config(model: Path) -> dict[str, Any]:
    """routerd serving the GGUF under two names, one loaded at a time (swap scenario)."""
    entry = {"model": str(model), "backend": "llama-server", "ctx_size": CTX_SIZE,
             "parallel": PARALLEL}
    return {"max_loaded": 1, "keep_alive": "1h", "models": {"smol-a": entry, "smol-b": entry}}


def fake_command(*flags: str) -> list[str]:
    return [sys.executable, str(FAKE_WORKER), "--host", "{host}", "--port", "{port}",
            "--api-key", "{api_key}", *flags]


def start_fake_worker(workdir: Path, *flags: str, name: str = "fake-direct") -> Proc:
    port, key = free_port(), "bench-fake-key"
    argv = [sys.executable, str(FAKE_WORKER), "--host", "127.0.0.1", "--port", str(port),
            "--api-key", key, *flags]
    proc = spawn(name, argv, workdir, port, headers={"Authorization": f"Bearer {key}"})
    wait_http(proc, "/health")
    return proc


def worker_pids(proc: Proc) -> list[int]:
    """routerd's live worker processes (its children)."""
    try:
        return [c.pid for c in psutil.Process(proc.pid).children()]
    except psutil.NoSuchProcess:
        return []


def worker_argv(pid: int) -> list[str]:
    try:
        return list(psutil.Process(pid).cmdline())
    except psutil.NoSuchProcess:
        return []
