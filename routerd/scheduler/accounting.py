"""The scheduler's books: what a model needs, what the budget is, what a worker really holds.

Estimates come from GGUF metadata (`memory.estimate`), placed on the GPUs by
`placement.place`; after a load the worker's real footprint (process-tree RSS via psutil,
per-process VRAM per GPU via NVML) replaces the estimate and is remembered for the next load
of the same model (`MeasurementBook`, persisted in the state dir). A worker whose VRAM grows
past what was booked for it is reported (`gpu.vram_over_booking`, `over_booking()`).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil
import structlog

from ..config import Config
from ..store import gguf
from . import memory, placement, rpcbooks
from .gpus import GpuDevice, GpuProbe, gpu_index, gpu_resource
from .policy import Loaded

if TYPE_CHECKING:
    from ..catalog import ModelEntry
    from ..workers.process import Worker

log = structlog.get_logger(__name__)

# A worker with no GGUF to read (a `command` backend) is booked at this until measured.
UNKNOWN_MODEL_BYTES = 64 * 1024**2


def read_info(path: str) -> gguf.GGUFInfo | None:
    """The model file's GGUF header (store/gguf.py's cache), or None when unreadable."""
    try:
        return gguf.header(path)
    except OSError:
        return None
    except gguf.GGUFError as e:
        log.warning("memory.unreadable_gguf", path=path, error=str(e))
        return None


def tree_pids(pid: int) -> set[int]:
    """A process and its descendants (a llamafile runs its server under `sh`)."""
    try:
        root = psutil.Process(pid)
        return {pid, *(p.pid for p in root.children(recursive=True))}
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return {pid}


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def rooms_for(budget: Mapping[str, int], indices: Sequence[int], loaded: Sequence[Loaded],
              reserved: Mapping[str, int] | None = None) -> list[placement.GpuRoom]:
    """Room per GPU: now (budget minus every booking and what is still exiting) and once the
    idle models are evicted."""
    out = []
    for i in indices:
        res = gpu_resource(i)
        booked = sum(m.need.get(res, 0) for m in loaded) + (reserved or {}).get(res, 0)
        idle = sum(m.need.get(res, 0) for m in loaded if m.in_use == 0)
        free = budget.get(res, 0) - booked
        out.append(placement.GpuRoom(i, free, free + idle))
    return out


@dataclass
class _Tracked:
    """A started worker the books follow: its placement, booking and VRAM growth."""

    model: str
    placement: placement.Placement
    booked: dict[str, int]
    used_before: dict[int, int]  # device used bytes before it started (the fallback measure)
    held: dict[str, int] = field(default_factory=dict)
    over: dict[str, int] = field(default_factory=dict)  # most VRAM seen past the booking
    by_delta: bool = False


class Accountant:
    def __init__(self, config: Config, *, ram: Any = None, gpu: Any = None,
                 book: Any = None, measure_tree: Any = None, pids: Any = None,
                 alive: Any = None, rpc_probe: Any = None) -> None:
        self.config = config
        self.ram = ram or memory.RamProbe()
        self.gpu = gpu or GpuProbe()
        state = config.expand(config.state_dir)
        self.book = book if book is not None else memory.MeasurementBook(
            Path(state) / "measurements.json")
        self._measure_tree = measure_tree or memory.measure_tree
        self._pids = pids or tree_pids
        self._alive = alive or _alive
        self._devices = self._gpu_devices()
        self._plans: dict[str, placement.Placement] = {}  # by model, for its next launch
        self._launching: dict[str, _Tracked] = {}
        self._tracked: dict[int, _Tracked] = {}  # by worker pid
        self._lock = threading.Lock()  # measure() runs in a thread
        self.rpc = rpcbooks.RpcDevices(rpc_probe)  # models with `rpc:` (rpcbooks.py)

    def _gpu_devices(self) -> list[GpuDevice]:
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

    def _current(self) -> list[GpuDevice]:
        """The managed GPUs with their memory figures now (NVML), by the managed indices."""
        if not self._devices:
            return []
        try:
            now = {d.index: d for d in self.gpu.devices()}
        except Exception as e:  # noqa: BLE001 - a GPU lost mid-run reads as full
            log.warning("memory.gpu_query_failed", error=str(e))
            now = {}
        return [now.get(d.index, replace(d, used=d.total, free=0)) for d in self._devices]

    def _ours(self) -> dict[int, int]:
        """VRAM per device our live workers hold (measured, else booked), pruning the dead."""
        out: dict[int, int] = {}
        with self._lock:
            for pid in [p for p in self._tracked if not self._alive(p)]:
                del self._tracked[pid]
            for t in self._tracked.values():
                for res, n in (t.held or t.booked).items():
                    i = gpu_index(res)
                    if i is not None:
                        out[i] = out.get(i, 0) + n
        return out

    def budget(self) -> dict[str, int]:
        """Bytes routerd may book per resource. A GPU's budget is its configured one (else
        total minus gpu_reserve), less what other processes hold there now."""
        out = {"ram": self.config.memory.ram_budget.resolve(self.ram.total())}
        gpus = self.config.memory.gpus
        explicit = {} if isinstance(gpus, str) else {g.index: g.budget for g in gpus}
        ours = self._ours()
        for d in self._current():
            cap = (explicit[d.index].resolve(d.total) if d.index in explicit
                   else d.total - self.config.memory.gpu_reserve)
            foreign = max(d.used - ours.get(d.index, 0), 0)
            usable = d.total - foreign - self.config.memory.gpu_reserve
            out[gpu_resource(d.index)] = max(0, min(cap, usable))
        out.update(self.rpc.budget())
        return out

    def gpus(self) -> list[dict[str, Any]]:
        """For /api/ps: each managed GPU's figures, its budget and what others hold there."""
        budget, ours = self.budget(), self._ours()
        return [{"index": d.index, "name": d.name, "total": d.total, "used": d.used,
                 "free": d.free, "budget": budget.get(gpu_resource(d.index), 0),
                 "routerd": ours.get(d.index, 0),
                 "other_processes": max(d.used - ours.get(d.index, 0), 0)}
                for d in self._current()]

    def _key(self, entry: ModelEntry) -> memory.MeasureKey | None:
        ls = entry.launch
        if not ls.path:
            return None
        try:
            return memory.MeasureKey.for_file(ls.path, ctx=ls.ctx_size, parallel=ls.parallel,
                                              backend=ls.backend)
        except OSError:
            return None

    def need(self, entry: ModelEntry, loaded: Sequence[Loaded] | None = None,
             reserved: Mapping[str, int] | None = None) -> tuple[dict[str, int], dict[str, int]]:
        """(bytes to book per resource, the raw estimate per resource). With ``loaded`` (the
        scheduler's other models) the GPU placement is decided against their bookings and
        kept for ``launch``; without, it is a what-if against empty GPUs."""
        ls = entry.launch
        info = read_info(ls.path) if ls.path else None
        key = self._key(entry)
        if info is None:
            est = {"ram": UNKNOWN_MODEL_BYTES}
            booked = {"ram": int(self.book.correct(key, UNKNOWN_MODEL_BYTES))} if key else est
            self._plans.pop(entry.name, None)
            return booked, est
        p: placement.Placement
        if ls.rpc:
            if loaded is not None:  # a load decision: ask the servers no model of ours holds
                held = rpcbooks.endpoints_held([m.need for m in loaded] + [reserved or {}])
                self.rpc.refresh(ls.rpc, held)
                self.rpc.require(ls.rpc)
            p = rpcbooks.place(info, ls, self.rpc, lambda kind, n: (
                self.book.correct(key, n, kind) if key is not None else n))
        else:
            p = self._place(entry, info, key, loaded or (), reserved)
        if loaded is not None:
            self._plans[entry.name] = p
        return dict(p.need), p.raw

    def _place(self, entry: ModelEntry, info: gguf.GGUFInfo, key: memory.MeasureKey | None,
               loaded: Sequence[Loaded], reserved: Mapping[str, int] | None
               ) -> placement.Placement:
        ls = entry.launch
        rooms = None
        if self._devices:
            indices = [d.index for d in self._devices]
            rooms = rooms_for(self.budget(), indices, loaded, reserved)
            if ls.gpus and not set(ls.gpus) & set(indices):
                log.warning("gpu.pin_unavailable", model=entry.name, pinned=list(ls.gpus),
                            managed=indices)

        def correct(kind: str, n: int) -> int:
            return int(self.book.correct(key, n, kind)) if key is not None else n

        p = placement.place(info, ctx_size=ls.ctx_size, parallel=ls.parallel,
                            backend=ls.backend, gpu_layers=ls.gpu_layers, rooms=rooms,
                            pin=ls.gpus, correct=correct)
        if rooms is not None:
            log.info("gpu.placed", model=entry.name, how=p.how,
                     gpu_layers=p.assignment.gpu_layers if p.assignment else None,
                     devices=list(p.assignment.devices) if p.assignment else [],
                     tensor_split=list(p.assignment.tensor_split) if p.assignment else [],
                     need=p.need)
        return p

    def launch(self, entry: ModelEntry) -> ModelEntry:
        """The entry to start: its LaunchSpec carries the placement decided by ``need``
        (-ngl, the devices, the tensor split); identity() is unchanged. The plan stays for a
        second attempt of the same load (the scheduler's retry after an OOM)."""
        p = self._plans.get(entry.name)
        if p is None:
            info = read_info(entry.launch.path) if entry.launch.path else None
            if info is None:
                return entry
            p = self._place(entry, info, self._key(entry), (), None)
        devices = p.assignment.devices if p.assignment else ()
        before = {d.index: d.used for d in self._current() if d.index in devices}
        self._launching[entry.name] = _Tracked(entry.name, p, dict(p.need), before)
        if p.assignment is None:
            return entry
        return replace(entry, launch=replace(entry.launch, placement=p.assignment))

    def placement_of(self, pid: int | None) -> placement.Placement | None:
        with self._lock:
            t = self._tracked.get(pid) if pid is not None else None
        return t.placement if t else None

    def over_booking(self) -> dict[str, dict[str, int]]:
        """{model: {"gpu0": bytes}}: how far past its booking each worker's VRAM has grown."""
        with self._lock:
            return {t.model: dict(t.over) for t in self._tracked.values() if t.over}

    def measure(self, entry: ModelEntry, worker: Worker, estimate: dict[str, int]
                ) -> dict[str, int] | None:
        if worker.pid is None:
            return None
        try:
            held = {"ram": int(self._measure_tree(worker.pid))}
        except Exception as e:  # noqa: BLE001 - the process may be gone already
            log.warning("memory.measure_failed", model=entry.name, error=str(e))
            return None
        with self._lock:
            t = self._tracked.get(worker.pid)
            if t is None:
                t = self._launching.pop(entry.name, None)
                if t is not None:
                    self._tracked[worker.pid] = t
        if self._devices:
            held.update(self._measure_vram(entry, worker.pid, t))
        if t is not None:
            for res, n in t.booked.items():  # a GPU it uses that NVML showed nothing for
                if gpu_index(res) is not None and not held.get(res):
                    log.warning("gpu.measure_missing", model=entry.name, resource=res,
                                kept=n)
                    held[res] = n
            self._check_growth(t, held)
        key = self._key(entry)
        if key is not None:
            kinds = t.placement.kinds if t is not None else {}
            for resource, n in held.items():
                self.book.record(key, n, estimate.get(resource, 0), kinds.get(resource, resource))
        if t is not None:  # remote devices stay booked as estimated: not measurable from here
            held.update(rpcbooks.remote_part(t.booked))
        log.info("memory.measured", model=entry.name, held=held, estimate=estimate)
        return held

    def _measure_vram(self, entry: ModelEntry, pid: int, t: _Tracked | None) -> dict[str, int]:
        """VRAM per GPU from NVML's per-process figures; where the driver cannot name our
        processes (another PID namespace), the growth of the device's used memory across the
        load instead, measured once."""
        per = self.gpu.process_memory(self._pids(pid))
        if per:
            return {gpu_resource(i): int(n) for i, n in per.items()}
        if t is None or not t.used_before:
            return {}
        if t.held:  # measured by delta at load: no per-process figure to follow it with
            return {r: n for r, n in t.held.items() if r != "ram"}
        now = {d.index: d.used for d in self._current()}
        t.by_delta = True
        log.info("gpu.measured_by_delta", model=entry.name, pid=pid)
        return {gpu_resource(i): max(now.get(i, before) - before, 0)
                for i, before in t.used_before.items()}

    def _check_growth(self, t: _Tracked, held: dict[str, int]) -> None:
        """Report VRAM past the booking, then follow the scheduler's booking: the first
        measurement replaces the estimate, later ones only raise it (the high-water mark)."""
        first = not t.held
        with self._lock:
            for res, n in held.items():
                if gpu_index(res) is None:
                    continue
                booked = t.booked.get(res, 0)
                if n > booked:
                    t.over[res] = max(t.over.get(res, 0), n - booked)
                    log.warning("gpu.vram_over_booking", model=t.model, resource=res,
                                held=n, booked=booked, over=n - booked,
                                at="load" if first else "growth")
                t.booked[res] = n if first else max(n, booked)
            t.held = dict(held)

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
