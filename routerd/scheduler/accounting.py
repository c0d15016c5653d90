"""The scheduler's books: what a model needs, what the budget is, what a worker really holds.

Estimates come from GGUF metadata (`memory.estimate`); after a load the worker's real footprint
(process-tree RSS via psutil, per-process VRAM via NVML) replaces the estimate and is remembered
for the next load of the same model (`MeasurementBook`, persisted in the state dir).
"""

from __future__ import annotations

import asyncio
import os
import time
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from ..config import Config
from ..store import gguf
from . import memory

if TYPE_CHECKING:
    from ..catalog import ModelEntry
    from ..workers.process import Worker

log = structlog.get_logger(__name__)

# A worker with no GGUF to read (a `command` backend) is booked at this until measured.
UNKNOWN_MODEL_BYTES = 64 * 1024**2


@lru_cache(maxsize=512)
def _read_info(path: str, size: int, mtime: float) -> gguf.GGUFInfo | None:
    try:
        zipped = None if gguf.is_gguf(path) else gguf.find_gguf_in_zip(path)
        return gguf.read_gguf(path, zipped.offset if zipped else 0)
    except (OSError, ValueError) as e:
        log.warning("memory.unreadable_gguf", path=path, error=str(e))
        return None


def read_info(path: str) -> gguf.GGUFInfo | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return _read_info(path, st.st_size, st.st_mtime)


class Accountant:
    def __init__(self, config: Config, *, ram: Any = None, gpu: Any = None,
                 book: Any = None, measure_tree: Any = None) -> None:
        self.config = config
        self.ram = ram or memory.RamProbe()
        self.gpu = gpu or memory.GpuProbe()
        state = config.expand(config.state_dir)
        self.book = book if book is not None else memory.MeasurementBook(
            Path(state) / "measurements.json")
        self._measure_tree = measure_tree or memory.measure_tree
        self._devices = self._gpu_devices()

    def _gpu_devices(self) -> list[Any]:
        gpus = self.config.memory.gpus
        if gpus == ():
            return []
        try:
            devices = list(self.gpu.devices())
        except Exception as e:  # noqa: BLE001 - no NVML is a normal machine
            log.info("memory.no_gpu", reason=str(e))
            return []
        if gpus == "auto":
            return devices
        wanted = {g.index for g in gpus}
        return [d for d in devices if d.index in wanted]

    def budget(self) -> dict[str, int]:
        out = {"ram": self.config.memory.ram_budget.resolve(self.ram.total())}
        gpus = self.config.memory.gpus
        explicit = {} if isinstance(gpus, str) else {g.index: g.budget for g in gpus}
        for d in self._devices:
            if d.index in explicit:
                out[f"gpu{d.index}"] = explicit[d.index].resolve(d.total)
            else:
                out[f"gpu{d.index}"] = max(0, d.total - self.config.memory.gpu_reserve)
        return out

    def _key(self, entry: ModelEntry) -> memory.MeasureKey | None:
        ls = entry.launch
        if not ls.path:
            return None
        try:
            return memory.MeasureKey.for_file(ls.path, ctx=ls.ctx_size, parallel=ls.parallel,
                                              backend=ls.backend)
        except OSError:
            return None

    def need(self, entry: ModelEntry) -> tuple[dict[str, int], dict[str, int]]:
        """(bytes to book per resource, the raw estimate per resource)."""
        ls = entry.launch
        info = read_info(ls.path) if ls.path else None
        if info is None:
            est = {"ram": UNKNOWN_MODEL_BYTES}
        else:
            gpu_layers = ls.gpu_layers
            if gpu_layers is None:
                gpu_layers = info.n_layer + 1 if self._devices else 0
            e = memory.estimate(info, ctx_size=ls.ctx_size, parallel=ls.parallel,
                                gpu_layers=gpu_layers, gpu_count=len(self._devices),
                                backend=ls.backend)
            est = e.need([d.index for d in self._devices])
        booked = dict(est)
        key = self._key(entry)
        if key is not None:
            for resource, n in est.items():
                booked[resource] = int(self.book.correct(key, n, resource))
        return booked, est

    def measure(self, entry: ModelEntry, worker: Worker, estimate: dict[str, int]
                ) -> dict[str, int] | None:
        if worker.pid is None:
            return None
        try:
            held = {"ram": int(self._measure_tree(worker.pid))}
        except Exception as e:  # noqa: BLE001 - the process may be gone already
            log.warning("memory.measure_failed", model=entry.name, error=str(e))
            return None
        if self._devices:
            vram = self.gpu.process_vram({worker.pid})
            if vram:
                held[f"gpu{self._devices[0].index}"] = int(vram)
        key = self._key(entry)
        if key is not None:
            for resource, n in held.items():
                self.book.record(key, n, estimate.get(resource, 0), resource)
        log.info("memory.measured", model=entry.name, held=held, estimate=estimate)
        return held

    async def wait_released(self, workers: list[Worker], timeout: float) -> None:
        """After a stop: the processes are reaped (RAM is back); wait for the GPU driver too."""
        if not self._devices:
            return
        pids = {w.pid for w in workers if w.pid}
        deadline = time.monotonic() + timeout
        delay = 0.01
        while pids and time.monotonic() < deadline:
            if not self.gpu.process_vram(pids):
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.25)
        log.warning("memory.release_slow", pids=sorted(pids), timeout=timeout)
