"""A lean HTTP/1.1 keep-alive load generator: N connections, each sending one prebuilt
request after another for a fixed time. Raw asyncio protocol, no client library in the loop,
so on a 2-core machine the load generator takes as little CPU as a Python one can."""

from __future__ import annotations

import asyncio
import json
import resource
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping
from urllib.parse import urlsplit


@dataclass
class LoadResult:
    requests: int
    errors: int
    seconds: float
    latencies: list[float] = field(default_factory=list)  # seconds, per completed request
    client_cpu: float = 0.0  # this process's CPU seconds during the run
    probes: dict[str, float] = field(default_factory=dict)  # each probe's change, same window

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def build_request(url: str, body: dict[str, Any], headers: dict[str, str]) -> bytes:
    parts = urlsplit(url)
    data = json.dumps(body).encode()
    lines = [f"POST {parts.path} HTTP/1.1", f"Host: {parts.netloc}",
             "Content-Type: application/json", f"Content-Length: {len(data)}",
             *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + data


class _Conn(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.waiter: asyncio.Future[int] | None = None
        self.need = -1  # total bytes of the response once its headers are in; -2 = chunked
        self.status = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        if self.waiter and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("connection closed"))

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.need == -1:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buf[:end]).lower()
            self.status = int(head[9:12])
            at = head.find(b"content-length:")
            if at >= 0:
                stop = head.find(b"\r\n", at)
                self.need = end + 4 + int(head[at + 15:stop if stop > 0 else None])
            else:
                self.need = -2
        done = (len(self.buf) >= self.need if self.need >= 0
                else self.buf.endswith(b"0\r\n\r\n"))
        if done and self.waiter and not self.waiter.done():
            self.waiter.set_result(self.status)

    async def send(self, request: bytes) -> int:
        assert self.transport is not None
        self.buf.clear()
        self.need, self.status = -1, 0
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        return await self.waiter


async def run(url: str, body: dict[str, Any], headers: dict[str, str], *,
              connections: int, seconds: float, warmup: float = 0.5,
              probes: Mapping[str, Callable[[], float]] | None = None) -> LoadResult:
    """Keep `connections` requests in flight for `seconds` (after a short warm-up).
    `probes` (e.g. a process's CPU seconds) are read at both ends of the measured window."""
    probes = probes or {}
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    request = build_request(url, body, headers)
    loop = asyncio.get_running_loop()
    conns = []
    for _ in range(connections):
        _, proto = await loop.create_connection(_Conn, host, port)
        conns.append(proto)
    result = LoadResult(0, 0, 0.0)
    state = {"measuring": False}

    async def worker(c: _Conn, until: float) -> None:
        while True:
            t0 = time.perf_counter()
            if t0 >= until:
                return
            try:
                status = await c.send(request)
            except ConnectionError:
                result.errors += 1
                return
            if state["measuring"]:
                if status == 200:
                    result.requests += 1
                    result.latencies.append(time.perf_counter() - t0)
                else:
                    result.errors += 1

    start = time.perf_counter()
    until = start + warmup + seconds
    tasks = [asyncio.create_task(worker(c, until)) for c in conns]
    await asyncio.sleep(warmup)
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    before = {k: f() for k, f in probes.items()}
    state["measuring"] = True
    t_measure = time.perf_counter()
    await asyncio.gather(*tasks)
    result.seconds = time.perf_counter() - t_measure
    result.probes = {k: f() - before[k] for k, f in probes.items()}
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    result.client_cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    for c in conns:
        if c.transport:
            c.transport.close()
    return result
