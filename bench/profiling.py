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
    inclusive: list[tuple[str, float]]  # frame, share of samples (routerd and aiohttp frames)
    leaf: list[tuple[str, float]]  # frame where the CPU was, share of samples


def _frame_name(frame: str) -> str:
    m = _FRAME.match(frame)
    if not m:
        return frame
    file = m.group("file")
    for marker in ("site-packages/", "lib/python3.11/", "/work/main/"):
        if marker in file:
            file = file.split(marker, 1)[1]
    return f"{m.group('func')} ({file})"


def summarize(raw: Path, n: int = 12) -> Top | None:
    """Top frames from py-spy's raw format (`frame;frame;... count` per line)."""
    if not raw.exists():
        return None
    incl: collections.Counter[str] = collections.Counter()
    leaf: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        k = int(count)
        total += k
        frames = [_frame_name(f) for f in stack.split(";")]
        if frames:
            leaf[frames[-1]] += k
        for f in set(frames):
            if "routerd/" in f or "aiohttp/" in f or "structlog/" in f:
                incl[f] += k
    if not total:
        return None
    share = lambda c: [(f, v / total) for f, v in c.most_common(n)]  # noqa: E731
    return Top(total, share(incl), share(leaf))


def markdown(title: str, top: Top | None) -> str:
    if top is None:
        return f"#### {title}\n\nno profile (py-spy missing or not permitted)\n"
    lines = [f"#### {title} ({top.samples} samples)", "",
             "| inclusive (routerd / aiohttp frames) | share | leaf (where the CPU was) | share |",
             "|---|---:|---|---:|"]
    for i in range(max(len(top.inclusive), len(top.leaf))):
        a = top.inclusive[i] if i < len(top.inclusive) else ("", 0.0)
        b = top.leaf[i] if i < len(top.leaf) else ("", 0.0)
        lines.append(f"| `{a[0]}` | {a[1]:.0%} | `{b[0]}` | {b[1]:.0%} |")
    return "\n".join(lines) + "\n"
