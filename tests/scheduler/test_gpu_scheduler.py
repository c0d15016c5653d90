"""The scheduler and the real accountant on simulated GPUs (tests/fakes/nvml.py): placement
per GPU, eviction per GPU, measured VRAM booked, growth past the booking reported, memory
held by other processes, and the argv routerd builds for each case. Fake workers, sparse
GGUFs: no processes, no GPU, milliseconds each."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest

from routerd.catalog import Catalog, ModelEntry
from routerd.config import parse_config
from routerd.metrics import Metrics
from routerd.scheduler import memory
from routerd.scheduler.accounting import Accountant, read_info
from routerd.scheduler.scheduler import Scheduler
from routerd.workers.backends import build_argv
from tests.fakes.gguf_model import write_sparse_gguf
from tests.fakes.nvml import GiB, SimulatedGpus
from tests.scheduler.test_scheduler import FakeWorker

pytestmark = pytest.mark.timeout(20)
MiB = 1 << 20
_pids = itertools.count(40000)


class FakeRam:
    def total(self) -> int:
        return 256 * GiB

    def available(self) -> int:
        return 200 * GiB


class GpuWorker(FakeWorker):
    """A fake engine that 'allocates' on the simulated GPUs what llama.cpp would for the argv
    routerd built (times ``scale``), and frees it when it stops."""

    def __init__(self, entry: ModelEntry, sim: SimulatedGpus, log: list[tuple[str, str]],
                 scale: float) -> None:
        super().__init__(entry.name, log)
        self.pid = next(_pids)
        self.entry, self.sim, self.scale = entry, sim, scale
        built = build_argv(entry.launch, host="127.0.0.1", port=1, api_key="k",
                           llama_server="/opt/llama-server")
        self.argv = built.argv
        self.env = {k: v for k, v in built.env.items() if k.startswith("CUDA_")}

    def flag(self, name: str) -> str | None:
        return self.argv[self.argv.index(name) + 1] if name in self.argv else None

    async def start(self, timeout: float) -> None:
        await super().start(timeout)
        p, info = self.entry.launch.placement, read_info(self.entry.launch.path)
        if p is None or not p.devices or info is None:
            return
        e = memory.estimate(info, ctx_size=self.entry.launch.ctx_size, parallel=1,
                            gpu_layers=p.gpu_layers, gpu_count=len(p.devices),
                            backend="llama-server", split=p.tensor_split or None)
        for dev, n in zip(p.devices, e.per_gpu):
            self.sim.allocate(self.pid, dev, int(n * self.scale))

    async def stop(self, *, drain: float, kill_after: float, on_drained: Any = None) -> None:
        await super().stop(drain=drain, kill_after=kill_after, on_drained=on_drained)
        self.sim.release(self.pid)


class Rig:
    def __init__(self, tmp: Path, sim: SimulatedGpus, models: dict[str, dict[str, Any]], *,
                 scale: float = 1.0, memory_cfg: dict[str, Any] | None = None) -> None:
        self.sim, self.scale = sim, scale
        path = write_sparse_gguf(tmp / "8b.gguf")
        cfg = {n: {"model": str(path), "backend": "llama-server", "ctx_size": 8192, **m}
               for n, m in models.items()}
        self.config = parse_config({"models": cfg, "state_dir": str(tmp / "state"),
                                    "keep_alive": "10m",
                                    "memory": memory_cfg or {"ram_budget": "90%"}})
        self.workers: dict[str, GpuWorker] = {}
        self.log: list[tuple[str, str]] = []
        self.acct = Accountant(self.config, ram=FakeRam(), gpu=sim,
                               measure_tree=lambda pid: 300 * MiB, pids=lambda pid: {pid},
                               alive=lambda pid: pid in sim.procs or pid in self.live())
        self.metrics = Metrics()

        def factory(entry: ModelEntry, on_exit: Any) -> GpuWorker:
            w = GpuWorker(entry, sim, self.log, self.scale)
            self.workers[entry.name] = w
            return w

        self.s = Scheduler(self.config, Catalog(self.config), factory,  # type: ignore[arg-type]
                           self.acct, metrics=self.metrics)

    def live(self) -> set[int]:
        return {w.pid for w in self.workers.values() if w.ready}

    async def use(self, name: str) -> GpuWorker:
        async with self.s.lease(name):
            pass
        return self.workers[name]

    def loaded(self) -> set[str]:
        return set(self.s.runners)


async def test_one_24gib_gpu_model_whole_and_measured_vram_booked(tmp_path: Path) -> None:
    rig = Rig(tmp_path, SimulatedGpus(24 * GiB), {"a": {}}, scale=0.9)
    w = await rig.use("a")
    assert w.flag("-ngl") == "33" and w.env["CUDA_VISIBLE_DEVICES"] == "0"
    assert w.flag("--tensor-split") is None
    r = rig.s.runners["a"]
    assert r.measured and r.need["gpu0"] == r.measured["gpu0"] == rig.sim.procs[w.pid][0]
    assert r.need["gpu0"] == pytest.approx(r.estimate["gpu0"] * 0.9, rel=0.01)
    assert rig.acct.over_booking() == {}
    # The next load of the same model books the measured figure, not the estimate.
    await rig.s.unload("a")
    booked, raw = rig.acct.need(rig.s.catalog.resolve("a"), [])
    assert booked["gpu0"] == r.measured["gpu0"] < raw["gpu0"]


async def test_two_12gib_gpus_spread_then_evict_per_gpu(tmp_path: Path) -> None:
    # Each 12 GiB card (11.5 GiB budget) holds two 8B copies at ctx 8192 (5.5 GiB each).
    models: dict[str, dict[str, Any]] = {n: {} for n in ("a", "b", "c", "d")} | {"e": {"gpu": 1}}
    rig = Rig(tmp_path, SimulatedGpus(12 * GiB, 12 * GiB), models)
    devices = {}
    for n in ("a", "b", "c", "d"):
        devices[n] = (await rig.use(n)).env["CUDA_VISIBLE_DEVICES"]
    assert devices == {"a": "0", "b": "1", "c": "0", "d": "1"}  # most free room each time
    assert rig.loaded() == {"a", "b", "c", "d"}
    await rig.use("b")
    await rig.use("d")  # least recently used: a, c (both on GPU 0), then b, d (GPU 1)
    # e is pinned to GPU 1: room is made there, by its own LRU model, never on GPU 0.
    await rig.use("e")
    assert rig.workers["e"].env["CUDA_VISIBLE_DEVICES"] == "1"
    assert rig.loaded() == {"a", "c", "d", "e"}
    assert [m for op, m in rig.log if op == "stop"] == ["b"]
    # An unpinned model goes where room is now (GPU 0 has 0.5 GiB, GPU 1 too): it evicts the
    # LRU model overall, a, on GPU 0.
    await rig.use("b")
    assert rig.workers["b"].env["CUDA_VISIBLE_DEVICES"] == "0"
    assert [m for op, m in rig.log if op == "stop"] == ["b", "a"]


async def test_model_too_big_for_one_gpu_is_split_with_tensor_split(tmp_path: Path) -> None:
    rig = Rig(tmp_path, SimulatedGpus(4 * GiB, 4 * GiB), {"a": {}})
    w = await rig.use("a")
    assert w.env["CUDA_VISIBLE_DEVICES"] == "0,1" and w.flag("-ngl") == "33"
    first, second = (w.flag("--tensor-split") or "").split(",")
    assert first == second and float(first) > 0  # equal rooms, equal shares
    assert w.flag("--main-gpu") == "0"
    r = rig.s.runners["a"]
    assert set(r.need) == {"ram", "gpu0", "gpu1"}
    assert r.need["gpu0"] <= 3.5 * GiB and r.need["gpu1"] <= 3.5 * GiB


async def test_another_process_holding_memory_shrinks_the_budget(tmp_path: Path) -> None:
    sim = SimulatedGpus(24 * GiB, 24 * GiB)
    sim.hold_other(0, 20 * GiB)  # a game, a training run, another server
    rig = Rig(tmp_path, sim, {"a": {}, "b": {"gpu": 0}})
    budget = rig.acct.budget()
    assert budget["gpu0"] == 24 * GiB - 20 * GiB - 512 * MiB
    assert budget["gpu1"] == 24 * GiB - 512 * MiB
    assert (await rig.use("a")).env["CUDA_VISIBLE_DEVICES"] == "1"
    # Our own worker's VRAM is not "another process": GPU 1's budget is unchanged.
    assert rig.acct.budget()["gpu1"] == budget["gpu1"]
    # Pinned to the crowded GPU: partial offload into the 3.5 GiB left, the rest in RAM.
    w = await rig.use("b")
    ngl = int(w.flag("-ngl") or 0)
    assert 0 < ngl < 33 and w.env["CUDA_VISIBLE_DEVICES"] == "0"
    r = rig.s.runners["b"]
    assert r.need["gpu0"] <= budget["gpu0"]
    assert {g["index"]: g["other_processes"] for g in rig.acct.gpus()}[0] == 20 * GiB


async def test_vram_growing_past_the_booking_is_reported(tmp_path: Path) -> None:
    rig = Rig(tmp_path, SimulatedGpus(24 * GiB), {"a": {}})
    w = await rig.use("a")
    runner = rig.s.runners["a"]
    booked = runner.need["gpu0"]
    rig.sim.allocate(w.pid, 0, booked + 300 * MiB)  # CUDA graphs, a workspace, a leak
    await rig.s._measure(runner)
    assert rig.acct.over_booking() == {"a": {"gpu0": 300 * MiB}}
    assert runner.need["gpu0"] == booked + 300 * MiB  # booked at the new high-water mark
    text = rig.metrics.render()[0].decode()
    assert 'routerd_vram_over_booking_bytes{model="a",resource="gpu0"} 3.145728e+08' in text


async def test_an_estimate_too_low_is_reported_at_load(tmp_path: Path) -> None:
    rig = Rig(tmp_path, SimulatedGpus(24 * GiB), {"a": {}}, scale=1.2)
    await rig.use("a")
    over = rig.acct.over_booking()["a"]["gpu0"]
    r = rig.s.runners["a"]
    assert over == r.measured["gpu0"] - r.estimate["gpu0"] > 0  # type: ignore[index]


async def test_driver_hiding_our_pids_measures_by_the_devices_growth(tmp_path: Path) -> None:
    sim = SimulatedGpus(24 * GiB, driver=300 * MiB)
    sim.hide_pids = True  # routerd in a container: NVML reports host PIDs
    rig = Rig(tmp_path, sim, {"a": {}}, scale=0.95)
    w = await rig.use("a")
    r = rig.s.runners["a"]
    assert r.measured and r.measured["gpu0"] == sim.procs[w.pid][0]


async def test_gpus_none_in_the_budget_means_cpu_and_engine_defaults(tmp_path: Path) -> None:
    rig = Rig(tmp_path, SimulatedGpus(24 * GiB), {"a": {}}, memory_cfg={"gpus": []})
    w = await rig.use("a")
    assert w.flag("-ngl") == "all" and w.env == {}
    assert set(rig.s.runners["a"].need) == {"ram"} and rig.acct.budget().keys() == {"ram"}


async def test_explicit_gpu_budget_list(tmp_path: Path) -> None:
    rig = Rig(tmp_path, SimulatedGpus(24 * GiB, 24 * GiB), {"a": {}},
              memory_cfg={"gpus": [{"index": 1, "budget": "4GiB"}]})
    assert set(rig.acct.budget()) == {"ram", "gpu1"} and rig.acct.budget()["gpu1"] == 4 * GiB
    w = await rig.use("a")
    assert w.env["CUDA_VISIBLE_DEVICES"] == "1" and int(w.flag("-ngl") or 0) < 33


async def test_api_ps_shape_of_the_gpu_fields(tmp_path: Path) -> None:
    rig = Rig(tmp_path, SimulatedGpus(24 * GiB), {"a": {}})
    await rig.use("a")
    gpus = rig.acct.gpus()
    assert gpus[0]["index"] == 0 and gpus[0]["routerd"] == rig.s.runners["a"].need["gpu0"]
    assert gpus[0]["budget"] == 24 * GiB - 512 * MiB and gpus[0]["other_processes"] == 0
    snap = rig.s.snapshot()[0]
    p = snap.entry.launch.placement
    assert p is not None and p.devices == (0,) and p.gpu_layers == 33


async def test_a_gpu_nvml_shows_nothing_for_keeps_its_booking(tmp_path: Path) -> None:
    sim = SimulatedGpus(24 * GiB)
    sim.hide_pids = True
    rig = Rig(tmp_path, sim, {"a": {}}, scale=0.0)  # nothing to see, per process or by delta
    await rig.use("a")
    r = rig.s.runners["a"]
    assert r.need["gpu0"] == r.estimate["gpu0"] > 0


async def test_measured_ratio_corrects_other_layer_counts_and_contexts(tmp_path: Path) -> None:
    rig = Rig(tmp_path, SimulatedGpus(24 * GiB), {"a": {}, "b": {"ctx_size": 4096}}, scale=0.8)
    await rig.use("a")
    booked, raw = rig.acct.need(rig.s.catalog.resolve("b"), [])
    assert booked["gpu0"] == pytest.approx(raw["gpu0"] * 0.8, rel=0.01)
