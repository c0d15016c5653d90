"""The NVML probe per device, against a fake pynvml module (no library, no GPU)."""

from __future__ import annotations

import sys
import types
from typing import Any

import pytest

from routerd.scheduler.gpus import GpuDevice, GpuProbe, gpu_index, gpu_resource


class FakeNVML(types.ModuleType):
    def __init__(self) -> None:
        super().__init__("pynvml")
        self.procs = {0: [(42, 3 << 30), (7, None)], 1: [(42, 1 << 30), (43, 2 << 30)]}

    def nvmlInit(self) -> None:
        pass

    def nvmlShutdown(self) -> None:
        pass

    def nvmlDeviceGetCount(self) -> int:
        return 2

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetMemoryInfo(self, h: int) -> Any:
        return types.SimpleNamespace(total=12 << 30, used=(h + 3) << 30, free=(9 - h) << 30)

    def nvmlDeviceGetName(self, h: int) -> str:
        return "Fake"

    def nvmlDeviceGetComputeRunningProcesses(self, h: int) -> list[Any]:
        return [types.SimpleNamespace(pid=p, usedGpuMemory=n) for p, n in self.procs[h]]


def test_process_memory_per_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", FakeNVML())
    probe = GpuProbe()
    assert probe.devices()[1] == GpuDevice(1, "Fake", 12 << 30, 4 << 30, 8 << 30)
    assert probe.process_memory({42}) == {0: 3 << 30, 1: 1 << 30}
    assert probe.process_memory({42, 43, 7}) == {0: 3 << 30, 1: 3 << 30}
    assert probe.process_memory({99}) == {} and probe.process_memory(set()) == {}
    assert probe.process_vram({42, 43}) == 6 << 30


def test_resource_names() -> None:
    assert gpu_resource(3) == "gpu3" and gpu_index("gpu3") == 3
    assert gpu_index("ram") is None and gpu_index("gpux") is None
