"""Compare routerd's memory estimate with what real workers use.

    .venv/bin/python bench/memory_estimate.py [--model PATH] [--backends llama-server,llama-cpp-python]

For each (ctx, parallel) it starts the worker, waits for /health 200, sends one
prompt longer than a ubatch (so the compute buffer is really touched), measures
the resident memory of the process tree and prints estimate vs measured. For
llama-server it also compares the KV/compute/model buffers its log states.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from routerd.scheduler.memory import MiB, estimate, measure_tree, parse_engine_buffers  # noqa: E402
from routerd.store.gguf import read_gguf  # noqa: E402

DEFAULT_MODEL = os.environ.get(
    "ROUTERD_TEST_MODEL", str(Path("~/.cache/routerd/models/SmolLM2-135M-Instruct.Q4_1.gguf").expanduser()))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def argv(backend: str, model: str, ctx: int, par: int, port: int) -> list[str]:
    if backend == "llama-server":
        return [str(ROOT / ".venv/bin/llama-server"), "-m", model, "-c", str(ctx), "-np", str(par),
                "--port", str(port), "--host", "127.0.0.1", "-lv", "4", "--cache-ram", "0",
                "--no-webui"]
    return [sys.executable, "-m", "routerd.engine", "--model", model, "--ctx-size", str(ctx),
            "--parallel", str(par), "--port", str(port), "--host", "127.0.0.1"]


def get(url: str, body: dict | None = None, timeout: float = 60) -> int:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            r.read()
            return int(r.status)
    except OSError:
        return 0


def run_one(backend: str, model: str, ctx: int, par: int) -> tuple[int, int, dict[str, dict[str, int]]]:
    port = free_port()
    with tempfile.TemporaryFile("w+") as logf:
        proc = subprocess.Popen(argv(backend, model, ctx, par, port), stdout=logf,
                                stderr=subprocess.STDOUT, cwd=ROOT)
        try:
            deadline = time.monotonic() + 120
            while get(f"http://127.0.0.1:{port}/health", timeout=2) != 200:
                if proc.poll() is not None or time.monotonic() > deadline:
                    logf.seek(0)
                    raise RuntimeError(f"{backend} did not become healthy:\n{logf.read()[-2000:]}")
                time.sleep(0.2)
            idle = measure_tree(proc.pid)
            # Fill most of one slot's context so the worst-case buffers are touched.
            sentence = "The quick brown fox jumps over the lazy dog. "  # 10 tokens
            prompt = sentence * int(ctx / (par if backend == "llama-server" else 1) * 0.85 / 10)
            get(f"http://127.0.0.1:{port}/completion", {"prompt": prompt, "n_predict": 4}, 600)
            rss = measure_tree(proc.pid)
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        logf.seek(0)
        return idle, rss, parse_engine_buffers(logf)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--backends", default="llama-server,llama-cpp-python")
    ap.add_argument("--ctx", default="2048,8192")
    ap.add_argument("--parallel", default="1,4")
    a = ap.parse_args()
    info = read_gguf(a.model)
    print(f"{'backend':17} {'ctx':>5} {'np':>2} | {'idle':>7} | {'estimate':>9} {'measured':>9} {'error':>7} |"
          f" {'kv est/log':>13} {'compute est/log':>15}")
    worst = 0.0
    for backend in a.backends.split(","):
        for ctx in map(int, a.ctx.split(",")):
            for par in map(int, a.parallel.split(",")):
                est = estimate(info, ctx_size=ctx, parallel=par, gpu_layers=None, gpu_count=0,
                               backend=backend)
                idle, rss, bufs = run_one(backend, a.model, ctx, par)
                err = (est.total - rss) / rss * 100
                worst = max(worst, abs(err))
                kv_log = sum(bufs.get("kv", {}).values())
                comp_log = sum(bufs.get("compute", {}).values()) + sum(bufs.get("output", {}).values())
                print(f"{backend:17} {ctx:5} {par:2} | {idle / MiB:6.1f}M | {est.total / MiB:8.1f}M {rss / MiB:8.1f}M "
                      f"{err:+6.1f}% | {est.kv / MiB:6.1f}/{kv_log / MiB:6.1f} "
                      f"{est.compute / MiB:7.1f}/{comp_log / MiB:7.1f}", flush=True)
    print(f"worst error {worst:.1f}%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
