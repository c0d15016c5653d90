from __future__ import annotations

import os
import subprocess
import sys
import time
import types
from dataclasses import replace
from pathlib import Path
from typing import Any

import psutil
import pytest

from routerd.scheduler import memory
from routerd.scheduler.memory import (
    GPU_CONTEXT,
    MiB,
    Estimate,
    GpuDevice,
    GpuProbe,
    MeasureKey,
    MeasurementBook,
    RamProbe,
    buffer_totals,
    compute_bytes,
    estimate,
    kv_bytes,
    kv_cells,
    measure_tree,
    parse_engine_buffers,
    weight_split,
)
from routerd.store.gguf import GGUFInfo, TensorInfo

LAYER = 2_216_448
EMBD = 30_081_024


def smollm2(**over: Any) -> GGUFInfo:
    """SmolLM2-135M-Instruct.Q4_1 as read_gguf reports it (tied embeddings)."""
    info = GGUFInfo(
        path="/m/smollm2.gguf", offset=0, size=98_362_432, version=3, architecture="llama",
        name="SmolLM2", file_type=3, quantization_level="Q4_1", parameter_count=134_515_008,
        parameter_size="134.52M", context_length=8192, n_layer=30, n_embd=576, n_ff=1536,
        n_head=9, n_head_kv=3, head_dim_k=64, head_dim_v=64, n_vocab=49152,
        tensor_bytes=96_576_768, tensors=(TensorInfo("token_embd.weight", EMBD, "Q8_0", 1),),
        layer_bytes=(LAYER,) * 30, input_bytes=EMBD, output_bytes=EMBD + 2304,
        chat_template=None, metadata={})
    return replace(info, **over)


def untied() -> GGUFInfo:
    return smollm2(output_bytes=EMBD + 2304, tensor_bytes=96_576_768 + EMBD)


@pytest.mark.parametrize("ctx, par, unified, expected", [
    (2048, 1, False, (2048, 2048)), (2048, 4, False, (2048, 512)), (8192, 4, False, (8192, 2048)),
    (1000, 3, False, (1536, 512)), (100, 1, False, (256, 256)), (4096, 2, True, (4096, 4096)),
])
def test_kv_cells_follow_llama_cpp(ctx: int, par: int, unified: bool, expected: tuple[int, int]) -> None:
    assert kv_cells(ctx, par, unified=unified) == expected


def test_kv_bytes() -> None:
    info = smollm2()
    assert kv_bytes(info, 2048) == 45 * MiB  # "CPU KV buffer size = 45.00 MiB"
    assert kv_bytes(info, 8192) == 180 * MiB
    assert kv_bytes(info, 2048, "q8_0", "q8_0") == 45 * MiB * 34 // 64
    assert kv_bytes(info, 2048, "f32", "q4_0") == int(30 * 3 * 64 * (4 + 18 / 32) * 2048)
    with pytest.raises(ValueError, match="q3_z"):
        kv_bytes(info, 2048, "q3_z")


# (n_ctx_seq, parallel, flash_attn, ubatch, n_outputs) -> MiB stated by the vendored
# llama.cpp's "sched_reserve: CPU compute buffer size" for SmolLM2.
LOGGED_COMPUTE = [
    (2048, 1, True, 512, 1, 15.51), (512, 4, True, 512, 4, 14.01), (8192, 1, True, 512, 1, 21.51),
    (2048, 4, True, 512, 4, 15.51), (512, 1, True, 512, 1, 14.01), (2048, 1, True, 128, 1, 3.88),
    (2048, 4, False, 512, 4, 46.38), (2048, 1, False, 512, 512, 99.38),
    (8192, 1, False, 512, 512, 166.38),
]


@pytest.mark.parametrize("seq, par, fa, ub, outs, logged", LOGGED_COMPUTE)
def test_compute_matches_llama_cpp_logs(seq: int, par: int, fa: bool, ub: int, outs: int,
                                        logged: float) -> None:
    info = smollm2()
    graph = compute_bytes(info, seq, par, flash_attn=fa, ubatch=ub, n_outputs=outs)
    graph -= par * info.n_vocab * 4  # the output buffer, logged on its own line
    assert graph / MiB == pytest.approx(logged, rel=0.015)


def test_weights_all_in_ram_without_gpu() -> None:
    assert weight_split(smollm2(), None, 0) == (96_576_768, 0, 0)
    assert weight_split(smollm2(), 20, 0) == (96_576_768, 0, 0)
    assert weight_split(untied(), None, 0) == (96_576_768 + EMBD, 0, 0)


def test_llama_cpp_offloads_the_output_layer_then_the_last_layers() -> None:
    # The vendored llama.cpp: i_gpu_start = n_layer + 1 - ngl, the output layer is layer n_layer.
    info = smollm2()
    head = EMBD + 2304  # tied: token_embd copied to the GPU with the output norm
    assert weight_split(info, 1, 1) == (EMBD + 30 * LAYER, head, 1)
    assert weight_split(info, 10, 1) == (EMBD + 21 * LAYER, 9 * LAYER + head, 10)
    assert weight_split(info, 30, 1) == (EMBD + LAYER, 29 * LAYER + head, 30)
    full = (EMBD, 30 * LAYER + head, 31)
    assert weight_split(info, 31, 1) == full
    assert weight_split(info, None, 1) == full and weight_split(info, -1, 2) == full
    assert weight_split(info, 999, 1) == full
    assert weight_split(info, 0, 1) == (EMBD + 30 * LAYER + 2304, 0, 0)
    assert weight_split(untied(), 30, 1) == (EMBD + LAYER, 29 * LAYER + EMBD + 2304, 30)


def test_cpu_estimate_adds_up() -> None:
    info = smollm2()
    e = estimate(info, ctx_size=2048, parallel=1, gpu_layers=None, gpu_count=0,
                 backend="llama-server")
    assert e.vram == 0 and e.per_gpu == () and e.kv == 45 * MiB
    assert e.ram == e.weights + e.kv + e.compute + e.overhead == e.total
    assert e.need() == {"ram": e.ram}


# Resident memory of the worker tree after a prompt filling 85 % of a slot,
# measured by bench/memory_estimate.py on the vendored engines (2 CPU cores, x86_64).
MEASURED_MIB = [
    ("llama-server", 2048, 1, 189.6), ("llama-server", 2048, 4, 185.5),
    ("llama-server", 8192, 1, 332.1), ("llama-server", 8192, 4, 325.4),
    ("llama-cpp-python", 2048, 1, 268.8), ("llama-cpp-python", 8192, 4, 549.3),
]


@pytest.mark.parametrize("backend, ctx, par, measured", MEASURED_MIB)
def test_estimate_within_10_percent_of_measured(backend: str, ctx: int, par: int,
                                                measured: float) -> None:
    e = estimate(smollm2(), ctx_size=ctx, parallel=par, gpu_layers=None, gpu_count=0,
                 backend=backend)
    assert e.total / MiB == pytest.approx(measured, rel=0.10)


def test_python_worker_kv_ignores_parallel() -> None:
    a = estimate(smollm2(), ctx_size=4096, parallel=1, gpu_layers=None, gpu_count=0,
                 backend="llama-cpp-python")
    b = replace(a)
    assert estimate(smollm2(), ctx_size=4096, parallel=4, gpu_layers=None, gpu_count=0,
                    backend="llama-cpp-python") == b


def test_zero_ctx_means_the_trained_context() -> None:
    kw: dict[str, Any] = dict(parallel=1, gpu_layers=None, gpu_count=0, backend="llama-server")
    assert estimate(smollm2(), ctx_size=0, **kw) == estimate(smollm2(), ctx_size=8192, **kw)


def test_gpu_estimate_splits_over_devices() -> None:
    info = smollm2()
    one = estimate(info, ctx_size=2048, parallel=1, gpu_layers=None, gpu_count=1,
                   backend="llama-server")
    assert one.ram == EMBD + one.overhead + 512 * 4 * 2 * 576 + 49152 * 4
    assert one.vram == 30 * LAYER + EMBD + 2304 + 45 * MiB + one.compute + GPU_CONTEXT
    two = estimate(info, ctx_size=2048, parallel=1, gpu_layers=None, gpu_count=2,
                   backend="llama-server")
    # An even split of 31 layers: 0-15 on the first device, 16-29 and the output on the second.
    kv = 45 * MiB // 30
    assert two.per_gpu == (16 * LAYER + 16 * kv + two.compute + GPU_CONTEXT,
                           14 * LAYER + EMBD + 2304 + 14 * kv + two.compute + GPU_CONTEXT)
    assert two.vram == sum(two.per_gpu) and two.vram > one.vram  # contexts and compute per GPU
    assert two.need([0, 3]) == {"ram": two.ram, "gpu0": two.per_gpu[0], "gpu3": two.per_gpu[1]}


def test_partial_offload_keeps_kv_of_cpu_layers_in_ram() -> None:
    info = smollm2()
    half = estimate(info, ctx_size=2048, parallel=1, gpu_layers=15, gpu_count=1,
                    backend="llama-server")
    assert half.ram > EMBD + 16 * LAYER + 45 * MiB * 16 // 30
    assert half.vram == 14 * LAYER + EMBD + 2304 + 45 * MiB * 14 // 30 + half.compute + GPU_CONTEXT
    none = estimate(info, ctx_size=2048, parallel=1, gpu_layers=0, gpu_count=1,
                    backend="llama-server")
    assert none.per_gpu == (GPU_CONTEXT,) and none.ram >= 96_576_768 + 45 * MiB


def test_python_worker_reserves_whole_ubatch_logits_on_gpu() -> None:
    cpu = estimate(smollm2(), ctx_size=2048, parallel=1, gpu_layers=None, gpu_count=0,
                   backend="llama-cpp-python")
    gpu = estimate(smollm2(), ctx_size=2048, parallel=1, gpu_layers=None, gpu_count=1,
                   backend="llama-cpp-python")
    assert gpu.compute / MiB == pytest.approx(99.38 + 0.19, rel=0.015)  # 512 x 49152 f32 logits
    assert cpu.compute < gpu.compute


def test_estimate_total_property() -> None:
    assert Estimate(ram=1, vram=2, weights=0, kv=0, compute=0, overhead=0).total == 3


LOG = """\
load_tensors: loading model tensors, this can take a while... (load_mode = mmap)
load_tensors:   CPU_Mapped model buffer size =    92.10 MiB
load_tensors:        CUDA0 model buffer size =  4096.50 MiB
llama_context:  CUDA_Host  output buffer size =     0.19 MiB
llama_kv_cache:      CUDA0 KV buffer size =    45.00 MiB
llama_kv_cache: size =   45.00 MiB (  2048 cells,  30 layers,  1/1 seqs), K (f16):   22.50 MiB
llama_kv_cache:      CUDA0 KV buffer size =     5.00 MiB
sched_reserve:      CUDA0 compute buffer size =   300.00 MiB
sched_reserve:  CUDA_Host compute buffer size =    12.01 MiB
llm_load_tensors:        CPU buffer size =    10.00 MiB
llama_memory_recurrent:        CPU RS buffer size =     1.50 MiB
common_memory_breakdown_print: |   - Host               |                  152 =    92 +      45 +      15                |
"""


def test_parse_engine_buffers() -> None:
    bufs = parse_engine_buffers(LOG.splitlines())
    mib = lambda x: int(x * MiB)  # noqa: E731
    assert bufs == {
        "model": {"CPU_Mapped": mib(92.10), "CUDA0": mib(4096.50), "CPU": mib(10.0)},
        "output": {"CUDA_Host": mib(0.19)},
        "kv": {"CUDA0": mib(45.0) + mib(5.0)},
        "compute": {"CUDA0": mib(300.0), "CUDA_Host": mib(12.01)},
        "rs": {"CPU": mib(1.5)},
    }
    host, dev = buffer_totals(bufs)
    assert host == mib(92.10) + mib(10.0) + mib(0.19) + mib(12.01) + mib(1.5)
    assert dev == mib(4096.50) + mib(50.0) + mib(300.0)
    assert parse_engine_buffers([]) == {}


def test_ram_probe_reads_cgroup_limit(tmp_path: Path) -> None:
    (tmp_path / "memory.max").write_text("1073741824\n")
    (tmp_path / "memory.current").write_text("268435456\n")
    probe = RamProbe(tmp_path)
    assert probe.total() == min(1 << 30, psutil.virtual_memory().total)
    assert probe.available() <= (1 << 30) - (1 << 28)
    (tmp_path / "memory.max").write_text("max\n")
    assert probe.total() == psutil.virtual_memory().total
    unlimited = RamProbe(tmp_path / "absent")
    assert unlimited.total() == psutil.virtual_memory().total and unlimited.available() > 0


class FakeNVML(types.ModuleType):
    """Stands in for pynvml: two 24 GiB GPUs, pid 42 using 3 GiB on each."""

    def __init__(self, fail_init: bool = False) -> None:
        super().__init__("pynvml")
        self.fail_init = fail_init
        self.shutdown = False

    def nvmlInit(self) -> None:
        if self.fail_init:
            raise RuntimeError("NVML Shared Library Not Found")

    def nvmlShutdown(self) -> None:
        self.shutdown = True

    def nvmlDeviceGetCount(self) -> int:
        return 2

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetMemoryInfo(self, h: int) -> Any:
        return types.SimpleNamespace(total=24 << 30, used=(h + 1) << 30, free=(23 - h) << 30)

    def nvmlDeviceGetName(self, h: int) -> bytes | str:
        return b"Fake GPU" if h == 0 else "Fake GPU"

    def nvmlDeviceGetComputeRunningProcesses(self, h: int) -> list[Any]:
        return [types.SimpleNamespace(pid=42, usedGpuMemory=3 << 30),
                types.SimpleNamespace(pid=7, usedGpuMemory=None)]


def test_gpu_probe_with_fake_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeNVML()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    probe = GpuProbe()
    assert probe.devices() == [
        GpuDevice(0, "Fake GPU", 24 << 30, 1 << 30, 23 << 30),
        GpuDevice(1, "Fake GPU", 24 << 30, 2 << 30, 22 << 30),
    ]
    assert probe.process_vram({42, 7}) == 6 << 30 and probe.process_vram({5}) == 0
    assert probe.process_vram(set()) == 0
    probe.close()
    assert fake.shutdown and probe.devices() == []


def test_gpu_probe_without_nvml_never_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", FakeNVML(fail_init=True))
    probe = GpuProbe()
    assert probe.devices() == [] and probe.process_vram({1}) == 0
    probe.close()


def test_gpu_probe_errors_mid_query(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeNVML()

    def boom(h: int) -> Any:
        raise RuntimeError("GPU is lost")

    fake.nvmlDeviceGetMemoryInfo = boom  # type: ignore[method-assign]
    fake.nvmlDeviceGetComputeRunningProcesses = boom  # type: ignore[method-assign]
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    probe = GpuProbe()
    assert probe.devices() == [] and probe.process_vram({42}) == 0


def test_real_gpu_probe_does_not_raise() -> None:
    probe = GpuProbe()
    assert isinstance(probe.devices(), list)
    assert probe.process_vram({os.getpid()}) >= 0
    probe.close()


def test_measure_tree_counts_children() -> None:
    proc = subprocess.Popen(["sh", "-c", "sleep 30 & wait"])
    try:
        parent = psutil.Process(proc.pid)
        deadline = time.monotonic() + 10
        while not parent.children() and time.monotonic() < deadline:
            time.sleep(0.01)
        child = parent.children()[0]
        total = measure_tree(proc.pid)
        assert total >= child.memory_info().rss > 0
        assert total > parent.memory_info().rss
    finally:
        for p in psutil.Process(proc.pid).children():
            p.kill()
        proc.kill()
        proc.wait()
    assert measure_tree(proc.pid) == 0


def key(tmp_path: Path, name: str = "m.gguf", backend: str = "llama-server", ctx: int = 2048) -> MeasureKey:
    f = tmp_path / name
    if not f.exists():
        f.write_bytes(b"GGUF")
    return MeasureKey.for_file(f, ctx=ctx, parallel=1, backend=backend)


def test_book_returns_measured_and_persists(tmp_path: Path) -> None:
    path = tmp_path / "state" / "memory.json"
    book = MeasurementBook(path)
    k = key(tmp_path)
    assert book.correct(k, 1000) == 1000
    book.record(k, measured=1200, estimated=1000)
    assert book.correct(k, 1000) == 1200
    book.record(k, measured=1100, estimated=1000)  # a later, smaller figure: keep the peak
    assert book.correct(k, 1000) == 1200
    book.record(k, measured=1500, estimated=1000)
    assert book.correct(k, 1000) == 1500
    book.record(k, measured=1200, estimated=1000)
    again = MeasurementBook(path)
    assert again.correct(k, 5) == 1500 and again.measured(k, "gpu0") is None
    assert [p.name for p in path.parent.iterdir()] == ["memory.json"]  # no temp files left


def test_book_scales_by_backend_ratio(tmp_path: Path) -> None:
    book = MeasurementBook(tmp_path / "m.json")
    book.record(key(tmp_path, "a.gguf"), measured=1100, estimated=1000)
    book.record(key(tmp_path, "b.gguf"), measured=1300, estimated=1000)
    book.record(key(tmp_path, "c.gguf"), measured=1200, estimated=1000)
    assert book.correct(key(tmp_path, "new.gguf"), 2000) == 2400  # median ratio 1.2
    other = key(tmp_path, "new.gguf", backend="llama-cpp-python")
    assert book.correct(other, 2000) == 2000
    assert book.correct(key(tmp_path, "new.gguf"), 2000, resource="gpu0") == 2000
    book.record(key(tmp_path, "d.gguf", backend="llamafile"), measured=100_000, estimated=10)
    assert book.correct(key(tmp_path, "e.gguf", backend="llamafile"), 100) == 300  # clamped


def test_book_key_changes_with_the_file(tmp_path: Path) -> None:
    book = MeasurementBook(tmp_path / "m.json")
    k = key(tmp_path)
    book.record(k, measured=5, estimated=4)
    (tmp_path / "m.gguf").write_bytes(b"GGUF changed")
    assert book.measured(key(tmp_path)) is None
    assert book.measured(key(tmp_path, ctx=4096)) is None and book.measured(k) == 5


@pytest.mark.parametrize("content", ["{not json", '{"entries": []}', "[]", ""])
def test_book_survives_a_corrupt_file(tmp_path: Path, content: str) -> None:
    path = tmp_path / "m.json"
    path.write_text(content)
    book = MeasurementBook(path)
    assert book.correct(key(tmp_path), 7) == 7
    book.record(key(tmp_path), measured=9, estimated=7)
    assert MeasurementBook(path).correct(key(tmp_path), 7) == 9


def test_module_has_no_test_hooks() -> None:
    assert not [n for n in vars(memory) if "fake" in n.lower() or "test" in n.lower()]


def test_max_gpu_layers() -> None:
    from routerd.scheduler.memory import max_gpu_layers

    info = smollm2()
    kw: dict[str, Any] = dict(ctx_size=2048, parallel=1, gpu_count=1, backend="llama-server")
    full = estimate(info, gpu_layers=None, **kw)
    assert max_gpu_layers(info, full.vram, **kw) == 31
    assert max_gpu_layers(info, full.vram - 1, **kw) == 30
    some = estimate(info, gpu_layers=12, **kw)
    assert max_gpu_layers(info, some.vram, **kw) == 12
    assert max_gpu_layers(info, GPU_CONTEXT, **kw) == 0
    assert max_gpu_layers(info, 1 << 40, ctx_size=2048, parallel=1, gpu_count=0,
                          backend="llama-server") == 0
