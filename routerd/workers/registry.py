"""Worker PIDs recorded in the state dir, so a restarted daemon can sweep what an earlier
run left behind (after a SIGKILL of the daemon on a system without PR_SET_PDEATHSIG)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import psutil
import structlog

log = structlog.get_logger(__name__)


class WorkerRegistry:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._live: dict[int, dict[str, Any]] = {}

    def record(self, worker: Any) -> None:
        pid = worker.pid
        try:
            created = psutil.Process(pid).create_time()
        except psutil.Error:
            return
        self._live[pid] = {"pid": pid, "model": worker.model, "created": created,
                           "daemon": os.getpid()}
        self._write()

    def forget(self, worker: Any) -> None:
        if self._live.pop(worker.pid, None) is not None:
            self._write()

    def _write(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(list(self._live.values())))
            os.replace(tmp, self.path)
        except OSError as e:
            log.warning("registry.write_failed", path=str(self.path), error=str(e))

    def sweep(self, timeout: float = 5.0) -> int:
        """Kill the process groups of workers recorded by an earlier daemon that still run."""
        try:
            entries = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return 0
        killed = []
        for e in entries if isinstance(entries, list) else []:
            try:
                pid, created = int(e["pid"]), float(e["created"])
                proc = psutil.Process(pid)
                if abs(proc.create_time() - created) > 1 or e.get("daemon") == os.getpid():
                    continue  # the pid was reused by something else
            except (psutil.Error, KeyError, TypeError, ValueError):
                continue
            log.warning("registry.orphan", pid=pid, model=e.get("model"))
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
            killed.append(proc)
        _wait_dead(killed, timeout)
        with contextlib.suppress(OSError):
            self.path.unlink()
        return len(killed)


def _dead(proc: psutil.Process) -> bool:
    try:
        return proc.status() == psutil.STATUS_ZOMBIE  # dead; reaping is its parent's business
    except psutil.NoSuchProcess:
        return True


def _wait_dead(procs: list[psutil.Process], timeout: float) -> None:
    """Until every process is gone (or a zombie): an orphan whose parent never reaps it (a
    container's init) must not hold the start-up for the whole timeout."""
    deadline = time.monotonic() + timeout
    while procs and time.monotonic() < deadline:
        procs = [p for p in procs if not _dead(p)]
        if procs:
            time.sleep(0.01)
