"""llama.cpp RPC across real hosts (network namespaces, tests/netns.py): host B runs
`routerd rpc-worker`, routerd in the root namespace serves SmolLM2 with `rpc: [B]`. The real
engine, the real rpc-server; one short completion each."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.error
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from routerd.workers import rpc
from tests.conftest import BIN, MOON, Daemon
from tests.netns import Host, network

RPC_SERVER = BIN / "rpc-server"
PORT = rpc.DEFAULT_PORT


@pytest.fixture(scope="module")
def rpc_server() -> Path:
    assert os.access(RPC_SERVER, os.X_OK), f"{RPC_SERVER} missing: run `make install`"
    return RPC_SERVER


def wait_rpc(endpoint: str, proc: subprocess.Popen[Any], timeout: float = 30) -> None:
    """Until the rpc-server at `endpoint` answers the memory probe."""
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, f"rpc-worker exited {proc.returncode}"
        try:
            rpc.probe(endpoint, timeout=1)
            return
        except rpc.RpcError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def start_worker(host: Host, log: Path, *extra: str) -> subprocess.Popen[Any]:
    out = open(log, "ab")
    return host.run([str(BIN / "routerd"), "rpc-worker", "--port", str(PORT), *extra],
                    stdout=out, stderr=subprocess.STDOUT)


def children(proc: subprocess.Popen[Any]) -> list[int]:
    try:
        return [c.pid for c in psutil.Process(proc.pid).children()]
    except psutil.NoSuchProcess:
        return []


def wait_for(cond: Any, timeout: float = 20, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.05)
    raise TimeoutError(what)


@pytest.fixture
def host_b(rpc_server: Path) -> Iterator[Host]:
    with network(1) as (b,):
        yield b


def ask(d: Daemon, model: str) -> dict[str, Any]:
    return d.post("/v1/chat/completions", {
        "model": model, "messages": [{"role": "user", "content": MOON}],
        "temperature": 0, "seed": 42, "max_tokens": 16}, timeout=180)


def test_a_model_on_a_remote_rpc_server_answers_as_the_local_one_and_its_weights_cross_the_veth(
        host_b: Host, model_path: Path, tmp_path: Path) -> None:
    worker = start_worker(host_b, tmp_path / "rpc-worker.log", "--host", host_b.addr)
    endpoint = f"{host_b.addr}:{PORT}"
    wait_rpc(endpoint, worker)
    common = {"model": str(model_path), "backend": "llama-server", "ctx_size": 1024,
              "parallel": 1, "embeddings": False}
    d = Daemon({"models": {"local": common, "remote": {**common, "rpc": [endpoint]}}},
               tmp_path / "a")
    try:
        local = ask(d, "local")
        rx0, tx0 = host_b.veth_bytes()
        remote = ask(d, "remote")
        rx1, tx1 = host_b.veth_bytes()
        ps = {m["name"]: m["routerd"] for m in d.get("/api/ps")["models"]}
    finally:
        assert d.stop() == 0, d.log()
    text = local["choices"][0]["message"]["content"]
    print(f"\nanswer ({local['usage']['completion_tokens']} tokens): {text!r}")
    assert text and remote["choices"][0]["message"]["content"] == text
    assert remote["usage"]["completion_tokens"] == local["usage"]["completion_tokens"]
    size = model_path.stat().st_size
    print(f"\nrpc: host B received {(rx1 - rx0) / 2**20:.1f} MiB, sent {(tx1 - tx0) / 2**20:.1f} "
          f"MiB; model file {size / 2**20:.1f} MiB; booked remote {ps['remote']['booked']}; "
          f"local {ps['local']['booked']}")
    assert rx1 - rx0 >= 0.8 * size  # the weights went to B
    booked = ps["remote"]["booked"]
    assert booked[f"rpc:{endpoint}"] >= 0.8 * size and booked[f"rpc:{endpoint}/client"] == 1
    assert booked["ram"] < ps["local"]["booked"]["ram"]  # not the whole model on local RAM
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(20) == 0
    assert host_b.pids() == []  # the rpc-server went with it


def test_rpc_worker_restarts_a_killed_rpc_server_and_its_child_dies_with_it(
        host_b: Host, tmp_path: Path) -> None:
    log = tmp_path / "rpc-worker.log"
    worker = start_worker(host_b, log, "--host", host_b.addr)
    endpoint = f"{host_b.addr}:{PORT}"
    wait_rpc(endpoint, worker)
    (first,) = wait_for(lambda: children(worker), what="rpc-server child")
    os.kill(first, signal.SIGKILL)
    second = wait_for(lambda: [p for p in children(worker) if p != first], what="a restart")
    wait_rpc(endpoint, worker)
    assert "rpc.exited" in log.read_text()
    os.kill(worker.pid, signal.SIGKILL)  # rpc-worker gone without a word: PDEATHSIG
    worker.wait(10)
    wait_for(lambda: not psutil.pid_exists(second[0])
             or psutil.Process(second[0]).status() == psutil.STATUS_ZOMBIE,
             what="the orphaned rpc-server to die")
    wait_for(lambda: not host_b.pids(), what="nothing left running on host B")


def test_rpc_worker_refuses_all_interfaces_unless_told_and_then_warns(
        host_b: Host, tmp_path: Path) -> None:
    r = subprocess.run([str(BIN / "routerd"), "rpc-worker", "--host", "0.0.0.0"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "refusing --host 0.0.0.0" in r.stderr
    log = tmp_path / "rpc-worker.log"
    worker = start_worker(host_b, log, "--host", "0.0.0.0", "--allow-all-interfaces")
    wait_rpc(f"{host_b.addr}:{PORT}", worker)
    assert "rpc.all_interfaces" in log.read_text()
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(20) == 0


def test_a_model_past_the_workers_mem_cap_fails_its_load_and_the_worker_stays_up(
        host_b: Host, model_path: Path, tmp_path: Path) -> None:
    log = tmp_path / "rpc-worker.log"
    worker = start_worker(host_b, log, "--host", host_b.addr, "--mem", "1MiB")
    endpoint = f"{host_b.addr}:{PORT}"
    wait_rpc(endpoint, worker)
    (child,) = children(worker)
    d = Daemon({"models": {"remote": {"model": str(model_path), "backend": "llama-server",
                                      "ctx_size": 1024, "embeddings": False,
                                      "rpc": [endpoint]}}}, tmp_path / "a")
    try:
        with pytest.raises(urllib.error.HTTPError) as e:
            ask(d, "remote")
        assert e.value.code >= 500
        print(f"\n--mem 1MiB: HTTP {e.value.code} {e.value.read()[:300]!r}")
    finally:
        assert d.stop() == 0, d.log()
    assert children(worker) == [child]  # B's rpc-server refused the allocation, not died
    wait_rpc(endpoint, worker)
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(20) == 0


def test_one_model_over_two_hosts_splits_its_layers_and_answers_as_the_local_one(
        rpc_server: Path, model_path: Path, tmp_path: Path) -> None:
    with network(2) as (b, c):
        workers = [start_worker(h, tmp_path / f"{h.name}.log", "--host", h.addr) for h in (b, c)]
        endpoints = [f"{h.addr}:{PORT}" for h in (b, c)]
        for ep, w in zip(endpoints, workers):
            wait_rpc(ep, w)
        common = {"model": str(model_path), "backend": "llama-server", "ctx_size": 1024,
                  "embeddings": False}
        d = Daemon({"rpc_pool": endpoints,
                    "models": {"local": common, "split": {**common, "rpc": True}}},
                   tmp_path / "a")
        try:
            local = ask(d, "local")
            before = [h.veth_bytes()[0] for h in (b, c)]
            split = ask(d, "split")
            got = [h.veth_bytes()[0] - x for h, x in zip((b, c), before)]
            booked = {m["name"]: m["routerd"]["booked"] for m in d.get("/api/ps")["models"]}
        finally:
            assert d.stop() == 0, d.log()
        assert split["choices"][0]["message"]["content"] == \
            local["choices"][0]["message"]["content"]
        size = model_path.stat().st_size
        print(f"\nrpc over two hosts: received {[round(g / 2**20, 1) for g in got]} MiB; "
              f"booked {booked['split']}")
        assert sum(got) >= 0.8 * size and min(got) >= 0.2 * size  # both hosts hold layers
        assert all(booked["split"][f"rpc:{ep}"] > 0.2 * size for ep in endpoints)
        for w in workers:
            w.send_signal(signal.SIGTERM)
            assert w.wait(20) == 0


def test_a_restarted_rpc_server_brings_the_remote_model_back_without_a_restart_of_routerd(
        host_b: Host, model_path: Path, tmp_path: Path) -> None:
    worker = start_worker(host_b, tmp_path / "rpc-worker.log", "--host", host_b.addr)
    endpoint = f"{host_b.addr}:{PORT}"
    wait_rpc(endpoint, worker)
    d = Daemon({"models": {"remote": {"model": str(model_path), "backend": "llama-server",
                                      "ctx_size": 1024, "embeddings": False,
                                      "rpc": [endpoint]}}}, tmp_path / "a")
    try:
        first = ask(d, "remote")["choices"][0]["message"]["content"]
        (child,) = children(worker)
        os.kill(child, signal.SIGKILL)  # B's rpc-server crashes under a loaded model
        wait_for(lambda: [p for p in children(worker) if p != child], what="a restart on B")

        def answered() -> str | None:
            try:
                return str(ask(d, "remote")["choices"][0]["message"]["content"])
            except urllib.error.HTTPError:
                return None  # the engine on A is being restarted after its own crash
        assert wait_for(answered, timeout=60, what="the model back") == first
    finally:
        assert d.stop() == 0, d.log()
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(20) == 0


def test_a_model_whose_rpc_server_is_down_gets_503_with_the_reason_and_retry_after(
        model_path: Path, tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        endpoint = f"127.0.0.1:{s.getsockname()[1]}"
    d = Daemon({"models": {"remote": {"model": str(model_path), "backend": "llama-server",
                                      "rpc": [endpoint]}}}, tmp_path / "a")
    try:
        with pytest.raises(urllib.error.HTTPError) as e:
            ask(d, "remote")
        body = e.value.read().decode()
        assert e.value.code == 503 and e.value.headers["Retry-After"] == "5"
        assert f"rpc-server {endpoint} unreachable" in body
        assert d.get("/api/ps")["models"] == []  # no engine was started
    finally:
        assert d.stop() == 0, d.log()


def test_rpc_worker_as_a_containers_pid_1_keeps_its_rpc_server(host_b: Host,
                                                                tmp_path: Path) -> None:
    log = tmp_path / "rpc-worker.log"
    out = open(log, "ab")
    worker = host_b.run(["unshare", "--pid", "--fork", "--kill-child", str(BIN / "routerd"),
                         "rpc-worker", "--host", host_b.addr, "--port", str(PORT)],
                        stdout=out, stderr=subprocess.STDOUT)
    wait_rpc(f"{host_b.addr}:{PORT}", worker)
    assert "rpc.exited" not in log.read_text()  # its child did not take it for an orphan
    os.killpg(worker.pid, signal.SIGTERM)  # unshare and rpc-worker (PID 1 inside) alike
    worker.wait(20)
    wait_for(lambda: not host_b.pids(), what="nothing left running on host B")
