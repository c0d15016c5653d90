"""llama.cpp RPC without an engine: the memory probe against a fake rpc-server speaking the
vendored protocol, the `rpc:` config key, llama-server's --rpc argv, the books for a model whose
layers are remote, and rpc-worker's checks and supervision."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import struct
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from routerd.config import ConfigError, parse_config
from routerd.scheduler import memory, policy, rpcbooks
from routerd.scheduler.policy import Loaded
from routerd.store.gguf import read_gguf
from routerd.workers import rpc, rpcworker
from routerd.workers.backends import BackendError, LaunchSpec, build_argv
from tests.fakes.gguf_model import write_sparse_gguf

GiB, MiB = 1 << 30, 1 << 20


@contextlib.contextmanager
def fake_rpc_server(devices: list[tuple[int, int]], *, major: int = 7,
                    answer: bool = True) -> Iterator[str]:
    """One client at a time, as rpc-server: HELLO, DEVICE_COUNT, GET_DEVICE_MEMORY."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    stop = threading.Event()

    def recv(c: socket.socket, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = c.recv(n - len(buf))
            if not chunk:
                raise ConnectionError
            buf += chunk
        return buf

    def reply(c: socket.socket, payload: bytes) -> None:
        c.sendall(struct.pack("<Q", len(payload)) + payload)

    def serve() -> None:
        srv.settimeout(0.1)
        while not stop.is_set():
            try:
                c, _ = srv.accept()
            except socket.timeout:
                continue
            with c, contextlib.suppress(ConnectionError, OSError):
                if not answer:
                    stop.wait(5)
                    continue
                while True:
                    cmd, size = struct.unpack("<BQ", recv(c, 9))
                    body = recv(c, size)
                    if cmd == 14:
                        assert size == 24
                        reply(c, bytes([major, 0, 0, 0]) + bytes(24))
                    elif cmd == 15:
                        reply(c, struct.pack("<I", len(devices)))
                    elif cmd == 11:
                        (dev,) = struct.unpack("<I", body)
                        reply(c, struct.pack("<QQ", *devices[dev]))

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield f"127.0.0.1:{srv.getsockname()[1]}"
    finally:
        stop.set()
        t.join(10)
        srv.close()


def test_probe_reads_each_devices_free_and_total_memory() -> None:
    with fake_rpc_server([(3 * GiB, 8 * GiB), (1 * GiB, 2 * GiB)]) as ep:
        assert rpc.probe(ep) == (rpc.DeviceMemory(3 * GiB, 8 * GiB),
                                 rpc.DeviceMemory(1 * GiB, 2 * GiB))


def test_probe_of_a_server_serving_another_client_times_out_as_busy() -> None:
    with fake_rpc_server([(1, 2)], answer=False) as ep:
        with pytest.raises(rpc.RpcBusy):
            rpc.probe(ep, timeout=0.3)


def test_probe_names_a_protocol_mismatch_and_an_unreachable_server() -> None:
    with fake_rpc_server([(1, 2)], major=3) as ep:
        with pytest.raises(rpc.RpcError, match="protocol 3.0.0"):
            rpc.probe(ep)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(rpc.RpcError, match="unreachable"):
        rpc.probe(f"127.0.0.1:{port}")


def _model_config(**model: object) -> dict[str, object]:
    return {"models": {"m": {"model": "/m.gguf", **model}}}


def test_the_rpc_key_takes_host_port_endpoints_for_llama_server() -> None:
    c = parse_config(_model_config(rpc=["10.0.0.2:50052", "gpu-box:50053"]))
    assert c.models["m"].rpc == ("10.0.0.2:50052", "gpu-box:50053")
    assert parse_config(_model_config()).models["m"].rpc == ()
    for bad in (["10.0.0.2"], ["[::1]:50052"], ["h:0"], ["h:70000"], "h:1", ["a:1", "a:1"]):
        with pytest.raises(ConfigError, match="rpc"):
            parse_config(_model_config(rpc=bad))
    with pytest.raises(ConfigError, match="llama-server"):
        parse_config(_model_config(rpc=["h:1"], backend="llama-cpp-python"))


def test_rpc_true_takes_the_top_level_pool() -> None:
    c = parse_config({"rpc_pool": ["10.0.0.2:50052", "10.0.0.3:50052"],
                      "models": {"a": {"model": "/m.gguf", "rpc": True},
                                 "b": {"model": "/m.gguf", "rpc": ["10.0.0.9:1"]},
                                 "c": {"model": "/m.gguf"}}})
    assert c.rpc_pool == ("10.0.0.2:50052", "10.0.0.3:50052")
    assert c.models["a"].rpc == c.rpc_pool
    assert c.models["b"].rpc == ("10.0.0.9:1",) and c.models["c"].rpc == ()
    with pytest.raises(ConfigError, match="rpc_pool"):
        parse_config(_model_config(rpc=True))
    with pytest.raises(ConfigError, match="rpc_pool"):
        parse_config({"rpc_pool": ["nope"]})


def test_llama_server_gets_rpc_and_other_backends_refuse_it() -> None:
    spec = LaunchSpec(model="m", path="/m.gguf", backend="llama-server",
                      rpc=("10.0.0.2:50052", "10.0.0.3:50052"))
    argv = build_argv(spec, host="127.0.0.1", port=1, api_key="k", llama_server="/ls").argv
    assert argv[argv.index("--rpc") + 1] == "10.0.0.2:50052,10.0.0.3:50052"
    plain = LaunchSpec(model="m", path="/m.gguf", backend="llama-server")
    assert "--rpc" not in build_argv(plain, host="h", port=1, api_key="k", llama_server="/ls").argv
    assert spec.identity() != plain.identity()  # a changed rpc list restarts the worker
    with pytest.raises(BackendError, match="rpc needs backend llama-server"):
        build_argv(LaunchSpec(model="m", path="/m.gguf", backend="llama-cpp-python",
                              rpc=("h:1",)), host="h", port=1, api_key="k", llama_server=None)


@pytest.fixture(scope="module")
def info(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    return read_gguf(write_sparse_gguf(tmp_path_factory.mktemp("g") / "8b.gguf"))


def _devices(free: dict[str, list[int]]) -> rpcbooks.RpcDevices:
    table = {ep: [rpc.DeviceMemory(f, 64 * GiB) for f in fs] for ep, fs in free.items()}
    d = rpcbooks.RpcDevices(probe=lambda ep: table[ep])
    d.refresh(list(free), held=set())
    return d


def test_a_remote_model_books_its_layers_on_the_servers_and_little_ram(info) -> None:  # type: ignore[no-untyped-def]
    devices = _devices({"h1:1": [20 * GiB]})
    ls = LaunchSpec(model="m", path="/m.gguf", backend="llama-server", ctx_size=8192,
                    rpc=("h1:1",))
    p = rpcbooks.place(info, ls, devices, correct=lambda kind, n: n)
    local = memory.estimate(info, ctx_size=8192, parallel=1, gpu_layers=0, gpu_count=0,
                            backend="llama-server")
    assert p.assignment is not None and p.assignment.devices == ()  # no local GPU
    assert p.assignment.gpu_layers == len(info.layer_bytes) + 1  # every layer remote
    remote = p.need["rpc:h1:1"]
    assert remote > 0.8 * local.weights  # the weights went to the server
    assert p.need["ram"] < 0.3 * local.ram  # embeddings, host graph, the engine
    assert p.need["rpc:h1:1/client"] == 1
    assert p.raw["rpc:h1:1"] == remote and p.raw["ram"] == p.estimate.ram
    assert devices.budget() == {"rpc:h1:1": 20 * GiB, "rpc:h1:1/client": 1}


def test_two_servers_share_the_layers_by_their_free_memory(info) -> None:  # type: ignore[no-untyped-def]
    devices = _devices({"h1:1": [30 * GiB], "h2:1": [10 * GiB]})
    ls = LaunchSpec(model="m", path="/m.gguf", backend="llama-server", rpc=("h1:1", "h2:1"))
    p = rpcbooks.place(info, ls, devices, correct=lambda kind, n: n)
    a, b = p.need["rpc:h1:1"], p.need["rpc:h2:1"]
    assert 2 * b < a < 4 * b  # about 3:1, in whole layers


def test_one_server_is_one_client_so_a_second_model_evicts_the_idle_first(info) -> None:  # type: ignore[no-untyped-def]
    devices = _devices({"h1:1": [60 * GiB]})
    ls = LaunchSpec(model="b", path="/m.gguf", backend="llama-server", rpc=("h1:1",))
    need = dict(rpcbooks.place(info, ls, devices, correct=lambda kind, n: n).need)
    first = Loaded("a", {"ram": MiB, "rpc:h1:1": GiB, "rpc:h1:1/client": 1}, in_use=0,
                   last_used=0.0, pinned=False)
    budget = {"ram": 64 * GiB, **devices.budget()}
    assert policy.choose_victims(need, [first], budget) == [first]
    busy = Loaded("a", first.need, in_use=1, last_used=0.0, pinned=False)
    assert policy.choose_victims(need, [busy], budget) is None  # waits for it
    assert rpcbooks.endpoints_held([first.need]) == {"h1:1"}


def test_an_unreachable_server_has_no_budget_and_the_refusal_names_it(info) -> None:  # type: ignore[no-untyped-def]
    def down(ep: str) -> list[rpc.DeviceMemory]:
        raise rpc.RpcError(f"rpc-server {ep} unreachable: refused")

    devices = rpcbooks.RpcDevices(probe=down)
    devices.refresh(["h9:1"], held=set())
    ls = LaunchSpec(model="m", path="/m.gguf", backend="llama-server", rpc=("h9:1",))
    need = rpcbooks.place(info, ls, devices, correct=lambda kind, n: n).need
    budget = {"ram": 64 * GiB, **devices.budget()}
    assert not policy.fits_at_all(need, budget)
    assert "rpc:h9:1" in policy.refusal_message(need, budget)
    assert "unreachable" in devices.errors["h9:1"]
    with pytest.raises(rpc.RpcError, match="unreachable") as e:
        devices.require(["h9:1"])
    assert e.value.status == 503 and e.value.headers["Retry-After"] == "5"


def _args(**over: object) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    rpcworker.add_arguments(p)
    ns = p.parse_args([])
    for k, v in over.items():
        setattr(ns, k, v)
    return ns


def test_rpc_worker_binds_loopback_by_default_and_refuses_all_interfaces() -> None:
    opts = rpcworker.options_from(_args())
    assert (opts.host, opts.port) == ("127.0.0.1", 50052)
    assert rpcworker.rpc_argv("/rpc-server", opts) == [
        "/rpc-server", "--host", "127.0.0.1", "--port", "50052"]
    with pytest.raises(ValueError, match="refusing --host 0.0.0.0"):
        rpcworker.options_from(_args(host="0.0.0.0"))
    assert rpcworker.options_from(_args(host="0.0.0.0", allow_all_interfaces=True)).host \
        == "0.0.0.0"
    with pytest.raises(ValueError, match="IPv4"):
        rpcworker.options_from(_args(host="::"))
    capped = rpcworker.options_from(_args(mem="2GiB", threads=4))
    assert capped.mem == 2 * GiB
    assert rpcworker.data_limit(capped) == 2 * GiB + 64 * MiB + 8 * 8 * MiB  # + stacks
    assert rpcworker.data_limit(rpcworker.options_from(_args())) is None


def test_rpc_worker_backoff_doubles_on_quick_crashes_and_resets_after_a_healthy_run() -> None:
    assert rpcworker.next_delay(0.5, 1.0) == 1.0
    assert rpcworker.next_delay(20.0, 1.0) == rpcworker.BACKOFF_MAX
    assert rpcworker.next_delay(20.0, rpcworker.HEALTHY_AFTER) == rpcworker.BACKOFF_FIRST


def test_supervise_restarts_a_child_that_exits_and_gives_up_when_bounded(tmp_path: Path) -> None:
    marks = tmp_path / "runs"
    argv = [sys.executable, "-c", f"open({str(marks)!r}, 'a').write('x'); raise SystemExit(3)"]
    rc = asyncio.run(rpcworker.supervise(argv, asyncio.Event(), max_restarts=1))
    assert rc == 3 and marks.read_text() == "xx"


def _stopped_by_supervise(tmp_path: Path, code: str) -> None:
    """Run `code` (which writes its pid to {pidfile}) under supervise, set the stop event once
    it runs: supervise returns 0 and the child is gone (or a zombie already reaped by none)."""
    pidfile = tmp_path / "pid"
    argv = [sys.executable, "-c", code.format(pidfile=repr(str(pidfile)))]

    async def go() -> int:
        stop = asyncio.Event()
        task = asyncio.ensure_future(rpcworker.supervise(argv, stop))
        for _ in range(200):
            if pidfile.exists() and pidfile.read_text():
                break
            await asyncio.sleep(0.02)
        stop.set()
        return await asyncio.wait_for(task, 20)

    assert asyncio.run(go()) == 0
    pid = int(pidfile.read_text())
    assert not Path(f"/proc/{pid}").exists() or \
        Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"


def test_supervise_stops_its_child_on_the_stop_event(tmp_path: Path) -> None:
    _stopped_by_supervise(tmp_path, "import os, time; open({pidfile}, 'w').write(str(os.getpid()));"
                                    " time.sleep(60)")


def test_supervise_kills_a_child_that_ignores_sigterm_after_the_wait(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rpcworker, "STOP_WAIT", 0.5)
    _stopped_by_supervise(tmp_path, "import os, signal, time; "
                                    "signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                                    "open({pidfile}, 'w').write(str(os.getpid())); time.sleep(60)")
