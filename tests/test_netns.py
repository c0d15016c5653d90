"""The network-namespace harness (tests/netns.py): real hosts that reach each other, counted
bytes, and nothing left behind."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request

import pytest

from tests.conftest import free_port
from tests.netns import Host, hosts, network  # noqa: F401  (hosts: a fixture)


def _wait_http(url: str, host: Host | None = None, timeout: float = 20) -> bytes:
    """GET `url` from the root namespace, or from inside `host`, until it answers."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if host is None:
                with urllib.request.urlopen(url, timeout=2) as r:
                    return r.read()
            code = ("import sys, urllib.request; "
                    "sys.stdout.buffer.write(urllib.request.urlopen(sys.argv[1], timeout=2).read())")
            proc = host.run([sys.executable, "-c", code, url], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
            out, _ = proc.communicate(timeout=10)
            if proc.returncode == 0:
                return out
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not answer")
        time.sleep(0.1)


def _ours() -> tuple[str, str]:
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-br", "link"], capture_output=True, text=True).stdout
    return netns, links


def test_two_hosts_reach_each_other_over_http_and_their_veth_counters_move(tmp_path) -> None:
    (tmp_path / "page.txt").write_bytes(b"x" * 200_000)
    with network(2) as (a, b):
        assert a.addr != b.addr
        port = free_port()
        b.run([sys.executable, "-m", "http.server", "--bind", b.addr, str(port),
               "--directory", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        before_a, before_b = a.veth_bytes(), b.veth_bytes()
        body = _wait_http(f"http://{b.addr}:{port}/page.txt", host=a)  # host a -> host b
        assert body == b"x" * 200_000
        after_a, after_b = a.veth_bytes(), b.veth_bytes()
        assert after_a[0] - before_a[0] >= 200_000  # a received the page
        assert after_b[1] - before_b[1] >= 200_000  # b sent it
        # the root namespace (the test process) reaches every host too
        assert _wait_http(f"http://{b.addr}:{port}/page.txt") == body


def test_a_host_server_bound_to_its_address_is_not_on_the_root_loopback() -> None:
    with network(1) as (a,):
        port = free_port()
        a.run([sys.executable, "-m", "http.server", "--bind", a.addr, str(port)],
              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_http(f"http://{a.addr}:{port}/")
        with pytest.raises(OSError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)


def test_nothing_is_left_after_the_network_not_even_when_the_test_fails() -> None:
    with pytest.raises(RuntimeError, match="boom"):
        with network(2) as (a, b):
            names = (a.name, b.name)
            proc = a.run(["sleep", "300"])
            # a process that left the group Host.run made is still found inside the namespace
            b.run(["setsid", "sleep", "300"])
            assert proc.poll() is None
            deadline = time.monotonic() + 10
            while len(b.pids()) < 1 and time.monotonic() < deadline:
                time.sleep(0.05)
            inside = a.pids() + b.pids()
            assert inside
            raise RuntimeError("boom")
    assert proc.poll() is not None
    netns, links = _ours()
    for name in names:
        assert name not in netns
        assert name not in links
    assert names[0][:-1] + "br" not in links
    for pid in inside:
        assert not _alive(pid)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_stale_namespaces_of_a_dead_run_are_removed_and_live_ones_kept() -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = f"rdt{dead.pid}za"
    subprocess.run(["ip", "netns", "add", stale], check=True)
    try:
        with network(1) as (a,):
            netns, _ = _ours()
            assert stale not in netns
            assert a.name in netns
    finally:
        subprocess.run(["ip", "netns", "delete", stale], capture_output=True)


def test_the_hosts_fixture_gives_hosts_for_one_test(hosts) -> None:  # noqa: F811
    (a,) = hosts(1)
    assert a.name in _ours()[0]
    assert a.veth_bytes()[0] >= 0
