"""py-spy on routerd while a scenario runs: raw collapsed stacks in, top frames out."""

from __future__ import annotations

import collections
import contextlib
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .procs import BIN

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def pyspy_path() -> str | None:
    beside = BIN / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


@contextlib.contextmanager
def record(pid: int, out: Path, rate: int = 250) -> Iterator[Path | None]:
    """Sample `pid` while the block runs; yield the raw output path (None without py-spy)."""
    exe = pyspy_path()
    if exe is None:
        yield None
        return
    err = open(out.with_suffix(".err"), "wb")
    popen = subprocess.Popen([exe, "record", "--pid", str(pid), "--format", "raw", "--rate",
                              str(rate), "--nonblocking", "-o", str(out)],
                             stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
    time.sleep(0.5)  # attach before the load starts
    try:
        yield out
    finally:
        popen.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
        try:
            popen.wait(30)
        except subprocess.TimeoutExpired:
            popen.kill()
            popen.wait(5)
        err.close()


@dataclass(frozen=True)
class Top:
    samples: int
    packages: list[tuple[str, float]]  # where the CPU was, by package (routerd by module)
    inclusive: list[tuple[str, float]]  # routerd functions, with what they call
    leaf: list[tuple[str, float]]  # frame where the CPU was


_PACKAGES = ("routerd/", "aiohttp/", "asyncio/", "structlog/", "prometheus_client/", "json/",
             "yarl/", "multidict/", "psutil/", "uvloop/")
_OUTER = {"main (routerd/cli.py)", "cmd_serve (routerd/cli.py)", "<module> (routerd)"}


def _file_and_name(frame: str) -> tuple[str, str]:
    m = _FRAME.match(frame)
    if not m:
        return "?", frame
    file = m.group("file")
    for marker in ("site-packages/", "lib/python3.11/", "/work/main/"):
        if marker in file:
            file = file.split(marker, 1)[1]
    return file, f"{m.group('func')} ({file})"


def _package(file: str) -> str:
    for p in _PACKAGES:
        if p in file:
            return file[file.index(p):] if p == "routerd/" else p.rstrip("/")
    return file.split("/")[0] or "?"


def summarize(raw: Path, n: int = 12) -> Top | None:
    """Top frames from py-spy's raw format (`frame;frame;... count` per line)."""
    if not raw.exists():
        return None
    pkgs: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    leaf: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        k = int(count)
        total += k
        frames = [_file_and_name(f) for f in stack.split(";")]
        pkgs[_package(frames[-1][0])] += k
        leaf[frames[-1][1]] += k
        for name in {name for file, name in frames if "routerd/" in file} - _OUTER:
            incl[name] += k
    if not total:
        return None
    share = lambda c: [(f, v / total) for f, v in c.most_common(n)]  # noqa: E731
    return Top(total, share(pkgs), share(incl), share(leaf))


def markdown(title: str, top: Top | None) -> str:
    if top is None:
        return f"#### {title}\n\nno profile (py-spy missing or not permitted)\n"
    lines = [f"#### {title} ({top.samples} samples)", "",
             "| CPU by package (self) | share | routerd function (inclusive) | share "
             "| hottest frame (self) | share |", "|---|---:|---|---:|---|---:|"]
    cols = (top.packages, top.inclusive, top.leaf)
    for i in range(max(len(c) for c in cols)):
        cells = []
        for c in cols:
            name, v = c[i] if i < len(c) else ("", 0.0)
            cells += [f"`{name}`" if name else "", f"{v:.0%}" if name else ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
