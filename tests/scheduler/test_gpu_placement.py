"""Placement on simulated GPUs, pure (no NVML, no processes): which GPU, how many layers, the
split, what is booked, and the argv routerd builds for each case."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import pytest

from routerd.scheduler import memory
from routerd.scheduler.placement import GpuRoom, Placement, measure_kind, place
from routerd.store.gguf import GGUFInfo, read_gguf
from routerd.workers.backends import LaunchSpec, build_argv
from tests.fakes.gguf_model import write_sparse_gguf

GiB, MiB = 1 << 30, 1 << 20
RESERVE = 512 * MiB


@lru_cache(maxsize=None)
def model(kind: str = "8b") -> GGUFInfo:
    """Llama 3 8B's shapes (Q4_0), or a 34-billion-ish one that needs two 12 GiB GPUs."""
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="routerd-gguf-"))
    if kind == "8b":
        return read_gguf(write_sparse_gguf(d / "8b.gguf"))
    return read_gguf(write_sparse_gguf(d / "big.gguf", n_layer=48, n_embd=7168, n_ff=20480,
                                       n_head=56, n_head_kv=8, name="Sparse-34B"))


def rooms(*free_gib: float, idle: tuple[float, ...] = ()) -> list[GpuRoom]:
    out = []
    for i, f in enumerate(free_gib):
        extra = idle[i] if i < len(idle) else 0.0
        out.append(GpuRoom(i, int(f * GiB), int((f + extra) * GiB)))
    return out


def put(info: GGUFInfo, r: list[GpuRoom] | None, **kw: Any) -> Placement:
    args: dict[str, Any] = dict(ctx_size=8192, parallel=1, backend="llama-server",
                                gpu_layers=None)
    args.update(kw)
    return place(info, rooms=r, **args)


def argv(p: Placement, backend: str = "llama-server") -> tuple[list[str], dict[str, str]]:
    spec = LaunchSpec(model="m", path="/m.gguf", backend=backend, placement=p.assignment)
    a = build_argv(spec, host="127.0.0.1", port=1, api_key="k", llama_server="/bin/llama-server")
    return a.argv, {k: v for k, v in a.env.items() if k.startswith("CUDA_")}


def flag(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args else None


def test_one_24gib_gpu_holds_an_8b_whole() -> None:
    p = put(model(), rooms(24 - 0.5))
    assert p.how == "gpu" and p.assignment is not None
    assert p.assignment.gpu_layers == 33 and p.assignment.devices == (0,)
    assert 5 * GiB < p.need["gpu0"] < 6 * GiB and p.need["ram"] < 1 * GiB
    args, env = argv(p)
    assert flag(args, "-ngl") == "33" and "--tensor-split" not in args
    assert env == {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": "0"}


def test_the_gpu_with_the_most_room_that_holds_it() -> None:
    p = put(model(), rooms(7, 9, 6))
    assert p.how == "gpu" and p.assignment and p.assignment.devices == (1,)
    assert set(p.need) == {"ram", "gpu1"}
    assert argv(p)[1]["CUDA_VISIBLE_DEVICES"] == "1"


def test_two_12gib_gpus_split_a_model_neither_holds() -> None:
    big = model("big")
    whole = memory.estimate(big, ctx_size=8192, parallel=1, gpu_layers=None, gpu_count=1,
                            backend="llama-server")
    assert 12 * GiB < whole.vram < 22 * GiB  # too big for one, fits two
    p = put(big, rooms(11.5, 11.5))
    assert p.how == "split" and p.assignment and p.assignment.devices == (0, 1)
    assert p.assignment.gpu_layers == big.n_layer + 1
    assert p.need["gpu0"] <= 11.5 * GiB and p.need["gpu1"] <= 11.5 * GiB
    args, env = argv(p)
    assert flag(args, "-ngl") == str(big.n_layer + 1)
    assert flag(args, "--tensor-split") == p.assignment.split_arg()
    assert flag(args, "--main-gpu") == "0" and env["CUDA_VISIBLE_DEVICES"] == "0,1"
    # The split follows the rooms: more room, more layers.
    q = put(big, rooms(9.5, 12))
    assert q.assignment and q.assignment.devices == (1, 0)  # most room first
    a, b = q.assignment.tensor_split
    assert a > b and q.need["gpu1"] > q.need["gpu0"]


def test_a_split_books_what_llama_cpp_puts_on_each_gpu() -> None:
    big = model("big")
    p = put(big, rooms(11.5, 11.5))
    assert p.assignment
    devs = memory.layer_devices(big.n_layer, p.assignment.gpu_layers, p.assignment.tensor_split)
    assert None not in devs and devs[0] == 0 and devs[-1] == 1  # contiguous, output last
    assert list(devs) == sorted(devs)  # type: ignore[type-var]


def test_another_process_holding_memory_leaves_partial_offload() -> None:
    # 24 GiB card, 20 GiB held by something else: 3.5 GiB of budget left.
    p = put(model(), rooms(24 - 20 - 0.5))
    assert p.how == "partial" and p.assignment and p.assignment.devices == (0,)
    ngl = p.assignment.gpu_layers
    assert 10 < ngl < 33
    assert p.need["gpu0"] <= 3.5 * GiB
    one_more = memory.estimate(model(), ctx_size=8192, parallel=1, gpu_layers=ngl + 1,
                               gpu_count=1, backend="llama-server")
    assert one_more.vram > 3.5 * GiB  # the most that fits
    cpu = memory.estimate(model(), ctx_size=8192, parallel=1, gpu_layers=0, gpu_count=0,
                          backend="llama-server")
    assert p.need["ram"] > 1 * GiB and p.need["ram"] < cpu.ram  # the rest is booked in RAM
    assert flag(argv(p)[0], "-ngl") == str(ngl)


def test_nothing_fits_on_any_gpu_runs_on_cpu() -> None:
    p = put(model(), rooms(0.2))
    assert p.how == "cpu" and p.assignment and p.assignment.devices == ()
    assert set(p.need) == {"ram"}
    args, env = argv(p)
    assert flag(args, "-ngl") == "0" and env["CUDA_VISIBLE_DEVICES"] == ""


def test_partial_over_two_gpus_when_that_holds_more_layers() -> None:
    big = model("big")
    p = put(big, rooms(7, 7))
    assert p.how == "partial" and p.assignment and p.assignment.devices == (0, 1)
    single = put(big, rooms(7))
    assert single.assignment and p.assignment.gpu_layers > single.assignment.gpu_layers


def test_evicting_idle_models_is_preferred_to_partial_offload() -> None:
    # GPU 0: 2 GiB free now, 20 GiB once its idle models go; GPU 1: 3 GiB and busy.
    p = put(model(), rooms(2, 3, idle=(18, 0)))
    assert p.how == "gpu" and p.assignment and p.assignment.devices == (0,)
    # ...but a model that fits the free room now goes there, evicting nothing.
    q = put(model(), rooms(2, 7, idle=(18, 0)))
    assert q.assignment and q.assignment.devices == (1,)


def test_pins() -> None:
    r = rooms(20, 8)
    p = put(model(), r, pin=(1,))
    assert p.assignment and p.assignment.devices == (1,)
    off = put(model(), r, pin=())
    assert off.how == "cpu" and off.assignment and off.assignment.devices == ()
    absent = put(model(), r, pin=(5,))
    assert absent.how == "cpu"
    both = put(model("big"), rooms(11.5, 11.5, 11.5), pin=(0, 2))
    assert both.assignment and set(both.assignment.devices) == {0, 2}


def test_gpu_layers_given_is_what_runs() -> None:
    p = put(model(), rooms(20), gpu_layers=10)
    assert p.how == "partial" and p.assignment and p.assignment.gpu_layers == 10
    assert flag(argv(p)[0], "-ngl") == "10"
    assert put(model(), rooms(20), gpu_layers=0).how == "cpu"
    assert put(model(), rooms(20), gpu_layers=999).assignment.gpu_layers == 33  # type: ignore[union-attr]
    # A number asked for that does not fit is booked anyway: the budget refuses it.
    p = put(model(), rooms(1), gpu_layers=33)
    assert p.need["gpu0"] > 1 * GiB


def test_no_managed_gpu_keeps_the_engine_default() -> None:
    p = put(model(), None)
    assert p.assignment is None and p.how == "cpu" and set(p.need) == {"ram"}
    args, env = argv(p)
    assert flag(args, "-ngl") == "all" and env == {}


def test_measurements_correct_the_booking_and_the_layer_count() -> None:
    seen: list[str] = []

    def correct(kind: str, n: int) -> int:
        seen.append(kind)
        return n * 2 if kind.startswith("vram") else n

    plain = put(model(), rooms(10))
    doubled = put(model(), rooms(10), correct=correct)
    assert plain.how == "gpu" and doubled.how == "partial"  # measured twice the estimate
    assert doubled.need["gpu0"] <= 10 * GiB
    assert doubled.raw["gpu0"] * 2 == doubled.need["gpu0"]
    assert "vram@ngl33" in seen and any(k.startswith("ram@ngl") for k in seen)
    assert doubled.kinds["gpu0"] == f"vram@ngl{doubled.assignment.gpu_layers}"  # type: ignore[union-attr]


def test_measure_kinds() -> None:
    assert measure_kind("ram", 0) == "ram"
    assert measure_kind("ram", 33, n_dev=1) == "ram@ngl33"
    assert measure_kind("vram", 33, 0, 1) == "vram@ngl33"
    assert measure_kind("vram", 49, 1, 2, 0.4) == "vram@ngl49:1/2:0.40"


@pytest.mark.parametrize("room_gib", [0.3, 1.0, 2.5, 3.7, 5.0, 9.0])
def test_max_gpu_layers_is_the_largest_that_fits(room_gib: float) -> None:
    info, room = model(), int(room_gib * GiB)
    kw: dict[str, Any] = dict(ctx_size=8192, parallel=1, gpu_count=1, backend="llama-server")
    linear = 0
    for ngl in range(1, info.n_layer + 2):
        if memory.estimate(info, gpu_layers=ngl, **kw).vram <= room:
            linear = ngl
    assert memory.max_gpu_layers(info, room, **kw) == linear
