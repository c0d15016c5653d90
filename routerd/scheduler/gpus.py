"""NVIDIA GPUs through NVML, behind a small interface the accountant is given.

``GpuProbe`` is the real one (nvidia-ml-py's ``pynvml``, imported lazily; no library, no
driver or any NVML error means "no GPUs", never an exception). Anything with the same three
methods can stand in for it: the tests hand the accountant a simulated NVML the way
Ollama's sched_test hands its scheduler a fake 24 GB GPU.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import structlog

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class GpuDevice:
    index: int  # NVML index; routerd starts engines with CUDA_DEVICE_ORDER=PCI_BUS_ID to match
    name: str
    total: int
    used: int
    free: int


class GpuSource(Protocol):
    """What the accountant needs from NVML."""

    def devices(self) -> list[GpuDevice]: ...

    def process_memory(self, pids: Iterable[int]) -> dict[int, int]:
        """Bytes used by these processes per device index (devices using none left out)."""
        ...

    def process_vram(self, pids: set[int]) -> int: ...


class GpuProbe:
    """NVIDIA GPUs through NVML; no NVML, no driver or any NVML error: no devices."""

    def __init__(self) -> None:
        self._nvml: Any = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
        except Exception as e:  # NVMLError_LibraryNotFound, DriverNotLoaded, ImportError
            log.info("gpu.probe_unavailable", reason=str(e) or type(e).__name__)

    def devices(self) -> list[GpuDevice]:
        nv = self._nvml
        if nv is None:
            return []
        try:
            out = []
            for i in range(nv.nvmlDeviceGetCount()):
                h = nv.nvmlDeviceGetHandleByIndex(i)
                mem = nv.nvmlDeviceGetMemoryInfo(h)
                name = nv.nvmlDeviceGetName(h)
                name = name.decode() if isinstance(name, bytes) else str(name)
                out.append(GpuDevice(i, name, int(mem.total), int(mem.used), int(mem.free)))
            return out
        except Exception as e:
            log.warning("gpu.probe_failed", error=str(e))
            return []

    def process_memory(self, pids: Iterable[int]) -> dict[int, int]:
        """Per device index, the VRAM these processes use (nvmlDeviceGetComputeRunningProcesses;
        a driver that hides it reports None, counted as 0)."""
        nv, wanted = self._nvml, set(pids)
        if nv is None or not wanted:
            return {}
        out: dict[int, int] = {}
        try:
            for i in range(nv.nvmlDeviceGetCount()):
                h = nv.nvmlDeviceGetHandleByIndex(i)
                for p in nv.nvmlDeviceGetComputeRunningProcesses(h):
                    if p.pid in wanted and p.usedGpuMemory:
                        out[i] = out.get(i, 0) + int(p.usedGpuMemory)
        except Exception as e:
            log.warning("gpu.process_vram_failed", error=str(e))
        return out

    def process_vram(self, pids: set[int]) -> int:
        """VRAM used by these processes on all GPUs (0 where the driver hides it)."""
        return sum(self.process_memory(pids).values())

    def close(self) -> None:
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except Exception:
                pass
            self._nvml = None


def gpu_resource(index: int) -> str:
    """The policy's name for a GPU's pool: 'gpu0'."""
    return f"gpu{index}"


def gpu_index(resource: str) -> int | None:
    """'gpu3' -> 3; anything else (ram) -> None."""
    if resource.startswith("gpu") and resource[3:].isdigit():
        return int(resource[3:])
    return None
