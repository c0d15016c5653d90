"""Real hosts on one machine: network namespaces joined by veth pairs to a test bridge.

    with network(2) as (a, b):
        server = b.run([sys.executable, "-m", "http.server", "--bind", b.addr, "8000"])
        urllib.request.urlopen(f"http://{b.addr}:8000/")   # from the root namespace
        a.run(["curl", f"http://{b.addr}:8000/"])          # from host a to host b

The root namespace holds a bridge with address .1 of a /24 of its own, so the test process
reaches every host and every host reaches it; traffic goes only to loopback and these
namespaces (no route to anything else is added). Names carry the test process's pid
(`rdt<pid><network letter><host letter>`), so parallel runs never clash, and leftovers of a killed earlier run
(whose pid is gone) are removed first. At exit — normal, a failing test, Ctrl+C or SIGTERM —
every process started through `Host.run`, anything else still running inside a namespace,
the veths, the bridge and the namespaces are removed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from typing import Any, Callable, Iterator

import pytest

PREFIX = "rdt"
_NAME = re.compile(rf"^{PREFIX}(\d+)[a-z]+v?$")
_SUPERNET = ipaddress.ip_network("10.231.0.0/16")
_LOCK = "/run/routerd-test-netns.lock"
_TERM_WAIT = 5.0


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr.strip()}")
    return proc


@dataclasses.dataclass
class Host:
    """One namespace: a host on the test bridge at `addr`."""

    name: str
    addr: str
    veth: str = "eth0"
    procs: list[subprocess.Popen[Any]] = dataclasses.field(default_factory=list, repr=False)

    def run(self, argv: list[str], **popen_kw: Any) -> subprocess.Popen[Any]:
        """Start `argv` inside this host, in its own process group; stopped at teardown."""
        popen_kw.setdefault("stdin", subprocess.DEVNULL)
        proc = subprocess.Popen(["ip", "netns", "exec", self.name, *argv],
                                start_new_session=True, **popen_kw)
        self.procs.append(proc)
        return proc

    def veth_bytes(self) -> tuple[int, int]:
        """(rx_bytes, tx_bytes) of this host's end of its veth pair."""
        out = _ip("-n", self.name, "-s", "-j", "link", "show", "dev", self.veth).stdout
        stats = json.loads(out)[0]["stats64"]
        return int(stats["rx"]["bytes"]), int(stats["tx"]["bytes"])

    def pids(self) -> list[int]:
        """Every process running inside this namespace (whoever started it)."""
        out = _ip("netns", "pids", self.name, check=False).stdout
        return [int(p) for p in out.split() if p.isdigit()]

    def stop(self) -> None:
        """SIGTERM every process group started here, SIGKILL after a bounded wait, then
        SIGKILL whatever else is still inside the namespace."""
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + _TERM_WAIT
        for proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # the group, also when the leader is gone
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
        _kill_all_inside(self.name)


def _kill_all_inside(ns: str) -> None:
    for _ in range(20):  # bounded: a process may fork while we kill
        pids = [int(p) for p in _ip("netns", "pids", ns, check=False).stdout.split() if p.isdigit()]
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale() -> list[str]:
    """Remove namespaces and bridges of ours whose creating process is gone."""
    removed = []
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        m = _NAME.match(name)
        if m and not _pid_alive(int(m.group(1))):
            _kill_all_inside(name)
            _ip("netns", "delete", name, check=False)
            removed.append(name)
    for link in json.loads(_ip("-j", "link", "show", check=False).stdout or "[]"):
        name = link.get("ifname", "")
        m = _NAME.match(name)
        if m and not _pid_alive(int(m.group(1))):
            _ip("link", "delete", name, check=False)
            removed.append(name)
    return removed


def _free_subnet(pid: int) -> ipaddress.IPv4Network:
    """A /24 of 10.231.0.0/16 no interface on this machine uses, tried from the pid's slot."""
    used = []
    for entry in json.loads(_ip("-4", "-j", "addr", "show").stdout or "[]"):
        for info in entry.get("addr_info", []):
            used.append(ipaddress.ip_network(f"{info['local']}/{info['prefixlen']}", strict=False))
    subnets = list(_SUPERNET.subnets(new_prefix=24))[1:-1]
    start = pid % len(subnets)
    for net in subnets[start:] + subnets[:start]:
        if not any(net.overlaps(u) for u in used):
            return net
    raise RuntimeError(f"no free /24 left in {_SUPERNET}")


def _require_capable() -> None:
    if os.geteuid() != 0:
        pytest.skip("network-namespace tests need root (ip netns)")
    if shutil.which("ip") is None:  # make test installs it: missing is a broken setup
        pytest.fail("network-namespace tests need `ip` (Debian package iproute2: make system-deps)")


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """While inside, SIGTERM unwinds like Ctrl+C, so the cleanup below still runs."""
    if threading.current_thread() is not threading.main_thread() \
            or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def raise_interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _setup(pid: int, count: int, names: list[str], bridge: str,
           created: list[tuple[str, str]]) -> list[Host]:
    remove_stale()
    net = _free_subnet(pid)
    gateway = net.network_address + 1
    _ip("link", "add", bridge, "type", "bridge")
    created.append(("link", bridge))
    _ip("addr", "add", f"{gateway}/{net.prefixlen}", "dev", bridge)
    _ip("link", "set", bridge, "up")
    hosts = []
    for i, ns in enumerate(names):
        _ip("netns", "add", ns)
        created.append(("netns", ns))
        outside = f"{ns}v"
        _ip("link", "add", outside, "type", "veth", "peer", "name", "eth0", "netns", ns)
        created.append(("link", outside))
        _ip("link", "set", outside, "master", bridge)
        _ip("link", "set", outside, "up")
        addr = str(net.network_address + 2 + i)
        _ip("-n", ns, "addr", "add", f"{addr}/{net.prefixlen}", "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        hosts.append(Host(name=ns, addr=addr))
    return hosts


_seqs: set[int] = set()


def _next_seq() -> int:
    seq = 0
    while seq in _seqs:
        seq += 1
    if seq > 25:
        raise RuntimeError("too many networks at once")
    _seqs.add(seq)
    return seq


def _release_seq(seq: int) -> None:
    _seqs.discard(seq)


@contextlib.contextmanager
def network(count: int) -> Iterator[list[Host]]:
    """`count` hosts (namespaces rdt<pid>aa, rdt<pid>ab, ...) on a fresh bridge; all
    removed at exit. Skips the test when not root or `ip` is missing."""
    _require_capable()
    if not 1 <= count <= 26:
        raise ValueError("count must be 1..26")
    pid = os.getpid()
    seq = _next_seq()  # several networks at once in one process get distinct names
    stem = f"{PREFIX}{pid}{chr(ord('a') + seq)}"
    names = [f"{stem}{chr(ord('a') + i)}" for i in range(count)]
    bridge = f"{stem}br"  # at most 13 characters: interface names stop at 15
    created: list[tuple[str, str]] = []
    hosts: list[Host] = []
    with _terminate_as_interrupt():
        try:
            with open(_LOCK, "w") as lock:  # parallel runs pick distinct subnets
                fcntl.flock(lock, fcntl.LOCK_EX)
                try:
                    hosts = _setup(pid, count, names, bridge, created)
                except RuntimeError as exc:
                    if "Operation not permitted" in str(exc):
                        pytest.fail(f"network namespaces not permitted here: {exc}")
                    raise
            yield hosts
        finally:
            for host in hosts:
                host.stop()
            for kind, name in reversed(created):
                if kind == "netns":
                    _kill_all_inside(name)
                    _ip("netns", "delete", name, check=False)
                else:
                    _ip("link", "delete", name, check=False)
            _release_seq(seq)


@pytest.fixture
def hosts() -> Iterator[Callable[[int], list[Host]]]:
    """A factory: `hosts(2)` gives two hosts for this test, removed when it ends."""
    with contextlib.ExitStack() as stack:
        yield lambda count: stack.enter_context(network(count))
