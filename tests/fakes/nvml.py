"""Simulated NVIDIA GPUs for the accountant (routerd.scheduler.gpus.GpuSource): devices with a
total, memory other processes hold, and per-process allocations the test makes, the way
Ollama's sched_test fakes a 24 GB GPU. No library, no driver, no GPU."""

from __future__ import annotations

from collections.abc import Iterable

from routerd.scheduler.gpus import GpuDevice

GiB = 1 << 30


class SimulatedGpus:
    def __init__(self, *totals: int, name: str = "Simulated GPU", driver: int = 0) -> None:
        self.totals = list(totals)
        self.name = name
        self.driver = driver  # what an idle device reports as used (driver, ECC reservations)
        self.others: dict[int, int] = {}  # device -> bytes held by processes that are not ours
        self.procs: dict[int, dict[int, int]] = {}  # pid -> {device: bytes}
        self.hide_pids = False  # a driver in another PID namespace: per-process figures empty

    # --- what the test does
    def hold_other(self, device: int, nbytes: int) -> None:
        self.others[device] = nbytes

    def allocate(self, pid: int, device: int, nbytes: int) -> None:
        self.procs.setdefault(pid, {})[device] = nbytes

    def release(self, pid: int) -> None:
        self.procs.pop(pid, None)

    # --- GpuSource
    def devices(self) -> list[GpuDevice]:
        out = []
        for i, total in enumerate(self.totals):
            used = self.driver + self.others.get(i, 0) + sum(
                p.get(i, 0) for p in self.procs.values())
            out.append(GpuDevice(i, self.name, total, used, max(total - used, 0)))
        return out

    def process_memory(self, pids: Iterable[int]) -> dict[int, int]:
        if self.hide_pids:
            return {}
        out: dict[int, int] = {}
        for pid in pids:
            for dev, n in self.procs.get(pid, {}).items():
                out[dev] = out.get(dev, 0) + n
        return out

    def process_vram(self, pids: set[int]) -> int:
        return sum(self.process_memory(pids).values())
