"""routerd.sdnotify against a real AF_UNIX datagram socket standing in for systemd."""

from __future__ import annotations

import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from routerd import sdnotify

pytestmark = [
    pytest.mark.timeout(30),
    pytest.mark.skipif(not hasattr(socket, "AF_UNIX"), reason="needs AF_UNIX"),
]


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    yield sock, str(path)
    sock.close()


def test_messages_reach_the_socket(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    env = {"NOTIFY_SOCKET": path}
    assert sdnotify.ready(env)
    assert sock.recv(4096) == b"READY=1"
    assert sdnotify.status("serving 2 models\non :11434", env)
    assert sock.recv(4096) == b"STATUS=serving 2 models on :11434"
    assert sdnotify.stopping(env)
    assert sock.recv(4096) == b"STOPPING=1"
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert sdnotify.reloading(env)
    first, second = sock.recv(4096).decode().split("\n")
    assert first == "RELOADING=1"
    assert second.startswith("MONOTONIC_USEC=") and int(second.split("=")[1]) >= before


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="abstract sockets are Linux")
def test_abstract_namespace() -> None:
    name = f"routerd-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        assert sdnotify.notify("READY=1", {"NOTIFY_SOCKET": "@" + name})
        assert sock.recv(4096) == b"READY=1"


def test_not_under_systemd(tmp_path: Path) -> None:
    assert sdnotify.notify("READY=1", {}) is False
    assert sdnotify.notify("READY=1", {"NOTIFY_SOCKET": ""}) is False
    assert sdnotify.notify("READY=1", {"NOTIFY_SOCKET": "vsock:2:1234"}) is False
    # a socket path nobody listens on: a failure, reported, never raised
    assert sdnotify.notify("READY=1", {"NOTIFY_SOCKET": str(tmp_path / "gone.sock")}) is False


def test_watchdog_interval() -> None:
    assert sdnotify.watchdog_interval({}) is None
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert sdnotify.watchdog_interval(
        {"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}) == 15.0
    assert sdnotify.watchdog_interval(
        {"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}) is None
