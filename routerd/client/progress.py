"""``routerd pull | rm | cp``: clients of the daemon's /api/pull, /api/delete, /api/copy.

On a terminal ``pull`` draws one bar per layer (size, rate, ETA), redrawn in place like
Ollama's CLI; otherwise it prints plain lines: each status once, and a layer's
progress at every quarter.  Each command returns an exit code (0 ok, 1 failure).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, TextIO

import aiohttp

from ..units import human_bytes
from .api import ndjson_lines

_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=10)
_BAR = 25


def human_duration(s: float) -> str:
    s = int(s + 0.5)
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


@dataclass
class Layer:
    digest: str
    total: int
    completed: int = 0
    started: float = field(default_factory=time.monotonic)
    base: int = -1  # bytes already there when we started watching (resumed/shared)
    printed_quarter: int = -1

    def update(self, completed: int, total: int) -> None:
        if self.base < 0:
            self.base = completed
        self.completed, self.total = completed, total or self.total

    def rate(self) -> float:
        dt = time.monotonic() - self.started
        return (self.completed - max(self.base, 0)) / dt if dt > 0.2 else 0.0

    def describe(self) -> str:
        pct = self.completed * 100 // self.total if self.total else 100
        text = f"{pct:3d}% {human_bytes(self.completed)}/{human_bytes(self.total)}"
        rate = self.rate()
        if rate > 0 and self.completed < self.total:
            eta = human_duration((self.total - self.completed) / rate)
            text += f"  {human_bytes(rate)}/s  {eta}"
        return text


class Renderer:
    """Turns progress events into output; TTY mode redraws, plain mode appends."""

    def __init__(self, out: TextIO, tty: bool) -> None:
        self.out, self.tty = out, tty
        self.lines: list[tuple[str, Layer | None]] = []  # status line, or a layer's bar
        self.layers: dict[str, Layer] = {}
        self.drawn = 0
        self.last_draw = 0.0

    def event(self, ev: dict[str, Any]) -> None:
        status, digest = str(ev.get("status", "")), ev.get("digest") or ""
        total, completed = int(ev.get("total") or 0), int(ev.get("completed") or 0)
        key = digest or (status if total else "")
        if key:
            layer = self.layers.get(key)
            if layer is None:
                layer = self.layers[key] = Layer(key, total)
                if self.lines and self.lines[-1] == (status, None):
                    self.lines.pop()  # "pulling x.gguf" becomes its bar
                self.lines.append((status, layer))
            layer.update(completed, total)
            self._plain_layer(status, layer)
        elif not self.lines or self.lines[-1][0] != status or self.lines[-1][1] is not None:
            self.lines.append((status, None))
            if not self.tty:
                self.out.write(status + "\n")
        self._draw()

    def _plain_layer(self, status: str, layer: Layer) -> None:
        if self.tty:
            return
        quarter = layer.completed * 4 // layer.total if layer.total else 4
        if quarter != layer.printed_quarter:
            layer.printed_quarter = quarter
            self.out.write(f"{status} {layer.describe()}\n")

    def _draw(self, force: bool = False) -> None:
        now = time.monotonic()
        if not self.tty or (not force and now - self.last_draw < 0.1):
            return
        self.last_draw = now
        buf = [f"\x1b[{self.drawn}A"] if self.drawn else []
        for status, layer in self.lines:
            buf.append("\r\x1b[2K" + (status if layer is None else _bar(status, layer)) + "\n")
        self.drawn = len(self.lines)
        self.out.write("".join(buf))
        self.out.flush()

    def finish(self) -> None:
        self._draw(force=True)
        self.out.flush()


def _bar(status: str, layer: Layer) -> str:
    frac = min(1.0, layer.completed / layer.total) if layer.total else 1.0
    filled = int(frac * _BAR)
    return f"{status}: ▕{'█' * filled}{' ' * (_BAR - filled)}▏ {layer.describe()}"


async def _lines(resp: aiohttp.ClientResponse) -> AsyncIterator[dict[str, Any]]:
    async for line in ndjson_lines(resp):
        yield json.loads(line)


def _error_text(status: int, text: str) -> str:
    try:
        body = json.loads(text)
        err = body.get("error") if isinstance(body, dict) else None
        if isinstance(err, dict):
            err = err.get("message")
        if err:
            return str(err)
    except ValueError:
        pass
    return text.strip() or f"HTTP {status}"


def _fail(out: TextIO, message: str) -> int:
    out.write(f"Error: {message}\n")
    out.flush()
    return 1


async def run_pull(base_url: str, name: str, insecure: bool, out: TextIO = sys.stderr) -> int:
    """``routerd pull NAME``: stream /api/pull with progress; 0 on success."""
    tty = hasattr(out, "isatty") and out.isatty()
    renderer = Renderer(out, tty)
    body = {"model": name, "insecure": insecure, "stream": True}
    try:
        async with aiohttp.ClientSession(timeout=_TIMEOUT) as session:  # noqa: SIM117
            async with session.post(base_url + "/api/pull", json=body) as resp:
                if resp.status >= 400:
                    return _fail(out, _error_text(resp.status, await resp.text()))
                last = ""
                async for ev in _lines(resp):
                    if "error" in ev:
                        renderer.finish()
                        return _fail(out, str(ev["error"]))
                    renderer.event(ev)
                    last = str(ev.get("status", ""))
    except aiohttp.ClientConnectorError:
        return _fail(out, f"could not connect to routerd at {base_url} (is `routerd serve` "
                          "running? Set ROUTERD_HOST to reach another address)")
    except (aiohttp.ClientError, ValueError) as e:
        renderer.finish()
        return _fail(out, f"pull interrupted: {e}")
    renderer.finish()
    return 0 if last == "success" else _fail(out, "the pull ended without success")


async def _simple(base_url: str, method: str, path: str, body: dict[str, Any], ok: str,
                  out: TextIO, err: TextIO) -> int:
    try:
        async with aiohttp.ClientSession(timeout=_TIMEOUT) as session:  # noqa: SIM117
            async with session.request(method, base_url + path, json=body) as resp:
                if resp.status >= 400:
                    return _fail(err, _error_text(resp.status, await resp.text()))
    except aiohttp.ClientConnectorError:
        return _fail(err, f"could not connect to routerd at {base_url} (is `routerd serve` "
                          "running? Set ROUTERD_HOST to reach another address)")
    except aiohttp.ClientError as e:
        return _fail(err, f"request to routerd at {base_url} failed: {e}")
    out.write(ok + "\n")
    return 0


async def run_rm(base_url: str, name: str, out: TextIO = sys.stdout,
                 err: TextIO = sys.stderr) -> int:
    """``routerd rm NAME``."""
    return await _simple(base_url, "DELETE", "/api/delete", {"model": name},
                         f"deleted '{name}'", out, err)


async def run_cp(base_url: str, src: str, dst: str, out: TextIO = sys.stdout,
                 err: TextIO = sys.stderr) -> int:
    """``routerd cp SRC DST``."""
    return await _simple(base_url, "POST", "/api/copy", {"source": src, "destination": dst},
                         f"copied '{src}' to '{dst}'", out, err)
