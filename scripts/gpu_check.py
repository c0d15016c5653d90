"""The checks of scripts/gpu-check.sh (issue 17), run against a real routerd and llama-server.

    python scripts/gpu_check.py --mode gpu|dry-run --llama-server BIN --model GGUF --out FILE

1. estimate vs measured memory per worker (NVML per-process VRAM on a GPU, RSS in a dry run)
   for two copies of the model under a budget that holds two of three;
2. LRU eviction by that budget when the third copy is asked for;
3. partial offload of a copy whose context makes it too big for the budget: the layer count
   routerd chose, and the answer;
4. tokens/s on GPU and on CPU, through routerd and straight from llama-server.
A dry run (no GPU) runs the same flow on the CPU build and says so in every line it writes.
Standard library and routerd only; every wait is bounded.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from routerd.scheduler import memory, placement  # noqa: E402
from routerd.store.gguf import read_gguf  # noqa: E402

MiB = 1 << 20
CTX = 2048
PROMPT = "Which city is the capital of France?"  # SmolLM2: "The capital of France is Paris."
STORY = "Write a long story about a dragon who learns to fly."
RESERVE = 512 * MiB


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http(url: str, body: dict[str, Any] | None = None, timeout: float = 300) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: the server exited {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"{url} not up after {timeout:.0f} s")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def nvidia_smi_apps() -> dict[int, int]:
    """pid -> MiB used, from nvidia-smi (a cross-check of NVML through routerd)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True,
                             timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    apps = {}
    for line in out.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit():
            apps[int(parts[0])] = int(parts[1])
    return apps


class Check:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.gpu = args, args.mode == "gpu"
        self.info = read_gguf(args.model)
        self.res = "gpu0" if self.gpu else "ram"
        self.lines: list[str] = []
        self.calibration: tuple[int, Path] | None = None
        self.failures: list[str] = []
        self.work = Path(args.work)
        self.work.mkdir(parents=True, exist_ok=True)

    def note(self, line: str = "") -> None:
        print(line, flush=True)
        self.lines.append(line)

    def verdict(self, ok: bool, what: str) -> str:
        if not ok:
            self.failures.append(what)
        return "ok" if ok else "FAILED"

    # --------------------------------------------------------------- sizing
    def copy_need(self, ctx: int) -> int:
        big_room = [placement.GpuRoom(0, 1 << 45, 1 << 45)] if self.gpu else None
        p = placement.place(self.info, ctx_size=ctx, parallel=1, backend="llama-server",
                            gpu_layers=None, rooms=big_room)
        return int(p.need[self.res])

    def config(self) -> tuple[dict[str, Any], int, int]:
        per_copy = self.copy_need(CTX)
        budget = int(per_copy * 2.5)  # two of three copies
        big_ctx = next((c for c in (16384, 32768, 65536, 131072)
                        if self.copy_need(c) > budget * 1.3), 131072)
        spec = {"model": str(self.args.model), "backend": "llama-server", "ctx_size": CTX}
        models: dict[str, Any] = {"a": spec, "b": spec, "c": spec,
                                  "big": {**spec, "ctx_size": big_ctx}}
        if self.gpu:
            models["cpu"] = {**spec, "gpus": []}
            mem: dict[str, Any] = {"ram_budget": "80%", "gpu_reserve": RESERVE,
                                   "gpus": [{"index": 0, "budget": budget}]}
        else:
            mem = {"ram_budget": budget, "gpus": []}
        cfg = {"host": "127.0.0.1", "port": free_port(), "keep_alive": "10m",
               "state_dir": str(self.work / "state"), "models_dir": str(self.work / "models"),
               "engines": {"llama_server": str(self.args.llama_server)},
               "memory": mem, "models": models}
        return cfg, budget, big_ctx

    # --------------------------------------------------------------- routerd
    def start_routerd(self, cfg: dict[str, Any]) -> subprocess.Popen[bytes]:
        import yaml

        path = self.work / "routerd.yaml"
        path.write_text(yaml.safe_dump(cfg))
        self.base = f"http://127.0.0.1:{cfg['port']}"
        log = open(self.work / "routerd.log", "ab")
        proc = subprocess.Popen([self.args.routerd, "serve", "--config", str(path)],
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_http(self.base + "/", proc, 60)
        return proc

    def gen(self, model: str, prompt: str = PROMPT, n: int = 8) -> dict[str, Any]:
        return http(self.base + "/api/generate", {
            "model": model, "prompt": prompt, "stream": False,
            "options": {"num_predict": n, "temperature": 0, "seed": 1}})

    def ps(self) -> dict[str, Any]:
        return http(self.base + "/api/ps")

    # --------------------------------------------------------------- checks
    def check_estimates(self) -> None:
        self.gen("a")
        self.gen("b")
        ps = self.ps()
        apps = nvidia_smi_apps() if self.gpu else {}
        self.note(f"| worker | estimate MiB | booked MiB | measured MiB | off | "
                  f"{'nvidia-smi MiB | ' if self.gpu else ''}verdict |")
        self.note(f"|---|---:|---:|---:|---:|{'---:|' if self.gpu else ''}---|")
        for m in sorted(ps["models"], key=lambda m: m["name"]):
            r = m["routerd"]
            est, got = r["estimate"].get(self.res, 0), (r["measured"] or {}).get(self.res, 0)
            off = (est - got) / got if got else float("inf")
            smi = f"{apps.get(r['pid'], 0)} | " if self.gpu else ""
            v = self.verdict(abs(off) <= 0.10, f"estimate of {m['name']} within 10 %")
            self.note(f"| {m['name']} ({self.res}) | {est / MiB:.1f} | "
                      f"{r['booked'].get(self.res, 0) / MiB:.1f} | {got / MiB:.1f} | "
                      f"{off * 100:+.1f} % | {smi}{v} |")
        self.note()
        self.note(f"budget {self.res}: {ps['routerd']['budget'].get(self.res, 0) / MiB:.1f} MiB; "
                  f"GPUs as routerd sees them: {json.dumps(ps['routerd'].get('gpus', []))}")
        over = ps["routerd"].get("vram_over_booking") or {}
        self.note(f"VRAM past its booking: {json.dumps(over) if over else 'none'}")

    def check_lru(self) -> None:
        self.gen("a")  # b is now the least recently used
        self.gen("c")
        loaded = {m["name"] for m in self.ps()["models"]}
        v = self.verdict(loaded == {"a", "c"}, "LRU eviction by budget")
        self.note(f"- asked a, b, a, c under a budget for two: loaded {sorted(loaded)} "
                  f"(expected ['a', 'c']): {v}")

    def check_partial(self, budget: int, big_ctx: int) -> None:
        full = self.copy_need(big_ctx)
        try:
            out = self.gen("big", n=16)
        except urllib.error.HTTPError as e:
            if self.gpu or e.code != 507:
                raise
            self.note(f"- dry run: `big` (ctx {big_ctx}, {full / MiB:.0f} MiB RAM) against a RAM "
                      f"budget of {budget / MiB:.0f} MiB: refused with 507, as it must be "
                      "without a GPU to offload layers to: ok")
            return
        ps = {m["name"]: m for m in self.ps()["models"]}
        g = ps.get("big", {}).get("routerd", {}).get("gpu")
        answer = out.get("response", "").strip().replace("\n", " ")
        right = "paris" in answer.lower()
        n_all = self.info.n_layer + 1
        self.note(f"- `big`: ctx {big_ctx}, whole it needs {full / MiB:.0f} MiB {self.res} "
                  f"against a budget of {budget / MiB:.0f} MiB")
        if self.gpu:
            ngl = g["gpu_layers"] if g else None
            partial = ngl is not None and 0 < ngl < n_all
            self.note(f"- routerd chose -ngl {ngl} of {n_all} (devices {g and g['devices']}): "
                      f"{self.verdict(partial, 'partial offload chosen')}")
        else:
            self.note("- dry run: no GPU, so no layer count to choose (placement "
                      f"{g}); the model is refused or loaded in RAM")
        self.note(f"- answer to {PROMPT!r}: {answer!r}: "
                  f"{self.verdict(right, 'partial-offload answer names Paris')}")

    def routerd_speed(self, model: str) -> float:
        self.gen(model, n=4)  # loaded and warm
        out = self.gen(model, STORY, n=128)
        return out["eval_count"] / (out["eval_duration"] / 1e9)

    def direct_speed(self, ngl: int) -> float:
        port = free_port()
        env = dict(os.environ)
        if ngl == 0:
            env["CUDA_VISIBLE_DEVICES"] = ""
        log_path = self.work / f"llama-server-ngl{ngl}.log"
        log = open(log_path, "wb")
        proc = subprocess.Popen([str(self.args.llama_server), "-m", str(self.args.model),
                                 "--host", "127.0.0.1", "--port", str(port), "-c", str(CTX),
                                 "-np", "1", "-ngl", str(ngl), "--no-webui", "-lv", "4"],
                                stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        try:
            wait_http(f"http://127.0.0.1:{port}/health", proc, 120)
            url = f"http://127.0.0.1:{port}/completion"
            http(url, {"prompt": PROMPT, "n_predict": 4})
            out = http(url, {"prompt": STORY, "n_predict": 128, "temperature": 0, "seed": 1})
            if self.gpu and ngl:
                self.calibration = (nvidia_smi_apps().get(proc.pid, 0), log_path)
            return float(out["timings"]["predicted_per_second"])
        finally:
            stop(proc)

    def check_speed(self) -> None:
        rows = [("routerd", "a", "GPU" if self.gpu else "CPU")]
        if self.gpu:
            rows.append(("routerd", "cpu", "CPU"))
        self.note("| path | where | tokens/s (128 tokens) |")
        self.note("|---|---|---:|")
        for path, model, where in rows:
            self.note(f"| {path} | {where} | {self.routerd_speed(model):.1f} |")
        for ngl in ([99, 0] if self.gpu else [0]):
            where = "GPU" if ngl else "CPU"
            self.note(f"| llama-server direct | {where} | {self.direct_speed(ngl):.1f} |")
        if self.calibration:
            self.note_calibration(*self.calibration)

    def note_calibration(self, nvml_mib: int, log_path: Path) -> None:
        """What llama-server's own buffers leave of its NVML figure: the CUDA context and
        workspaces, which the estimate books as memory.GPU_CONTEXT per GPU."""
        buffers = memory.parse_engine_buffers(log_path.read_text(errors="replace").splitlines())
        dev = {k: sum(n for name, n in per.items() if not memory.is_host_buffer(name))
               for k, per in buffers.items()}
        total = sum(dev.values())
        self.note()
        self.note(f"Direct llama-server on the GPU (-ngl 99, -c {CTX}): nvidia-smi "
                  f"{nvml_mib} MiB; its device buffers "
                  + ", ".join(f"{k} {n / MiB:.1f}" for k, n in sorted(dev.items()) if n)
                  + f" MiB = {total / MiB:.1f} MiB; the rest, {nvml_mib - total / MiB:.0f} MiB, "
                  f"is the CUDA context and workspaces (the estimate books "
                  f"{memory.GPU_CONTEXT / MiB:.0f} MiB).")

    # --------------------------------------------------------------- run
    def run(self) -> int:
        when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        if not self.gpu:
            self.note("# DRY RUN on CPU: not GPU figures")
            self.note()
            self.note("This file is the rehearsal of scripts/gpu-check.sh on a machine without "
                      "a GPU; it proves the flow, not the GPU path. docs/gpu.md is written only "
                      "by a run on a GPU.")
        else:
            self.note("# routerd on a GPU: measured")
        self.note()
        self.note(f"Run {when}; model {Path(self.args.model).name} "
                  f"({self.info.n_layer} layers); engine {self.args.llama_server}; "
                  f"{self.args.device or 'no GPU'}.")
        cfg, budget, big_ctx = self.config()
        proc = self.start_routerd(cfg)
        try:
            for title, step in (
                    ("Estimate vs measured, per worker", self.check_estimates),
                    ("LRU eviction by " + ("VRAM" if self.gpu else "RAM"), self.check_lru),
                    ("Partial offload", lambda: self.check_partial(budget, big_ctx)),
                    ("Tokens/s", self.check_speed)):
                self.note()
                self.note(f"## {title}")
                self.note()
                t0 = time.monotonic()
                try:
                    step()
                except Exception as e:  # noqa: BLE001 - record and go on to the next check
                    self.failures.append(f"{title}: {e}")
                    self.note(f"- FAILED: {type(e).__name__}: {e}")
                print(f"[gpu-check] {title}: {time.monotonic() - t0:.1f} s", flush=True)
        finally:
            stop(proc)
        self.note()
        self.note(f"Result: {len(self.failures)} check(s) failed"
                  + (": " + "; ".join(self.failures) if self.failures else "") + ".")
        Path(self.args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(self.args.out).write_text("\n".join(self.lines) + "\n")
        print(f"[gpu-check] wrote {self.args.out}", flush=True)
        return 1 if self.failures else 0


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--mode", choices=("gpu", "dry-run"), required=True)
    p.add_argument("--llama-server", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--work", default="/tmp/routerd-gpu-check")
    p.add_argument("--routerd", default=str(ROOT / ".venv/bin/routerd"))
    p.add_argument("--device", default="", help="the GPU, in words, for the report")
    return Check(p.parse_args()).run()


if __name__ == "__main__":
    sys.exit(main())
