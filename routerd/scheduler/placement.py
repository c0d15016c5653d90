"""Where a model goes: which GPUs, how many layers on them, the rest in RAM. Pure: no I/O.

Ollama's order, by budget rather than by raw free memory:
1. the GPU with the most room that holds the whole model (every layer and the output layer);
2. else split over the fewest GPUs (most room first) that hold it whole together, the
   tensor split proportional to each one's room (`--tensor-split`, `--main-gpu`);
3. first with the room free now, then with the room that evicting idle models would free
   (the policy then evicts, per GPU, only what that needs);
4. else, for `gpu_layers: auto`, partial offload: as many layers as fit the room (on the
   best GPU, or split over all allowed ones when that holds more), the rest booked in RAM.
`gpu: N` / `gpus: [..]` restrict the candidates; `gpus: []` or `gpu_layers: 0` keep it on CPU.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from ..store.gguf import GGUFInfo
from ..workers.backends import GpuAssignment
from . import memory
from .gpus import gpu_resource

# (measurement kind, estimated bytes) -> bytes to book: the MeasurementBook's correction.
Correct = Callable[[str, int], int]


def _identity(_kind: str, n: int) -> int:
    return n


@dataclass(frozen=True)
class GpuRoom:
    index: int  # NVML index
    free: int  # the GPU's budget minus what loaded models have booked on it
    reclaimable: int  # free plus what idle models hold there (room once they are evicted)


@dataclass(frozen=True)
class Placement:
    assignment: GpuAssignment | None  # None: routerd manages no GPU (engine defaults)
    need: Mapping[str, int]  # bytes to book per resource, corrected by measurements
    estimate: memory.Estimate
    how: str  # "cpu" | "gpu" | "split" | "partial"
    kinds: Mapping[str, str] = field(default_factory=dict)  # resource -> measurement kind

    @property
    def raw(self) -> dict[str, int]:
        """The uncorrected estimate per resource."""
        devices = self.assignment.devices if self.assignment else ()
        return self.estimate.need(devices)


def measure_kind(resource: str, gpu_layers: int, pos: int = 0, n_dev: int = 0,
                 share: float = 1.0) -> str:
    """The MeasurementBook resource a figure is filed under: what it depends on besides the
    model file, ctx, parallel and backend. CPU-only RAM stays "ram" (as before GPUs)."""
    if n_dev == 0:
        return "ram"
    if resource == "ram":
        return f"ram@ngl{gpu_layers}"
    tail = f":{pos}/{n_dev}:{share:.2f}" if n_dev > 1 else ""
    return f"vram@ngl{gpu_layers}{tail}"


@dataclass(frozen=True)
class _Model:
    info: GGUFInfo
    ctx_size: int
    parallel: int
    backend: str
    correct: Correct

    def cost(self, rooms: Sequence[GpuRoom], ngl: int,
             split: Sequence[float]) -> tuple[memory.Estimate, dict[str, int], dict[str, str]]:
        """(estimate, corrected need, measurement kinds) for ngl layers on these GPUs."""
        e = memory.estimate(self.info, ctx_size=self.ctx_size, parallel=self.parallel,
                            gpu_layers=ngl, gpu_count=len(rooms), backend=self.backend,
                            split=split if len(rooms) > 1 else None)
        total = sum(split) or 1.0
        kinds = {"ram": measure_kind("ram", ngl, n_dev=len(rooms))}
        for pos, r in enumerate(rooms):
            share = split[pos] / total if len(rooms) > 1 else 1.0
            kinds[gpu_resource(r.index)] = measure_kind("vram", ngl, pos, len(rooms), share)
        raw = e.need([r.index for r in rooms])
        return e, {res: int(self.correct(kinds[res], n)) for res, n in raw.items()}, kinds

    def fixed_per_gpu(self) -> int:
        """What each GPU holds whatever its share of layers: compute buffer, CUDA context."""
        one = memory.estimate(self.info, ctx_size=self.ctx_size, parallel=self.parallel,
                              gpu_layers=1, gpu_count=1, backend=self.backend)
        return one.compute + memory.GPU_CONTEXT


def _fits(need: Mapping[str, int], rooms: Sequence[GpuRoom], phase: str) -> bool:
    return all(need.get(gpu_resource(r.index), 0) <= getattr(r, phase) for r in rooms)


def _split(rooms: Sequence[GpuRoom], phase: str, fixed: int) -> tuple[float, ...]:
    """Tensor-split proportions: each GPU's room beyond its fixed cost, in MiB."""
    return tuple(round(max(getattr(r, phase) - fixed, memory.MiB) / memory.MiB, 1)
                 for r in rooms)


def _assignment(rooms: Sequence[GpuRoom], ngl: int, split: Sequence[float]) -> GpuAssignment:
    return GpuAssignment(gpu_layers=ngl, devices=tuple(r.index for r in rooms),
                         tensor_split=tuple(split) if len(rooms) > 1 else ())


def place(info: GGUFInfo, *, ctx_size: int, parallel: int, backend: str,
          gpu_layers: int | None, rooms: Sequence[GpuRoom] | None,
          pin: Sequence[int] | None = None, correct: Correct | None = None) -> Placement:
    """The placement of one model. ``rooms`` None: no GPU is managed (no NVML, or the
    budget lists none); the engine then keeps its own default and only RAM is booked."""
    m = _Model(info, ctx_size, parallel, backend, correct or _identity)
    if rooms is None:
        e, need, kinds = m.cost((), 0, ())
        return Placement(None, need, e, "cpu", kinds)
    allowed = [r for r in rooms if pin is None or r.index in pin]
    n_all = len(info.layer_bytes) + 1
    want = n_all if gpu_layers is None else min(max(gpu_layers, 0), n_all)
    if not allowed or want == 0:
        e, need, kinds = m.cost((), 0, ())
        return Placement(GpuAssignment(0), need, e, "cpu", kinds)
    fixed = m.fixed_per_gpu()
    for phase in ("free", "reclaimable"):
        ranked = sorted(allowed, key=lambda r: (-getattr(r, phase), r.index))
        for k in range(1, len(ranked) + 1):
            chosen = ranked[:k]
            split = _split(chosen, phase, fixed)
            e, need, kinds = m.cost(chosen, want, split)
            if _fits(need, chosen, phase):
                how = "partial" if want < n_all else "gpu" if k == 1 else "split"
                return Placement(_assignment(chosen, want, split), need, e, how, kinds)
    ranked = sorted(allowed, key=lambda r: (-r.reclaimable, r.index))
    if gpu_layers is not None:  # a number asked for: book it on the best GPU, fit or not
        e, need, kinds = m.cost(ranked[:1], want, (1.0,))
        how = "partial" if want < n_all else "gpu"
        return Placement(_assignment(ranked[:1], want, ()), need, e, how, kinds)
    return _partial(m, ranked, fixed)


def _partial(m: _Model, ranked: Sequence[GpuRoom], fixed: int) -> Placement:
    """gpu_layers: auto and the whole model fits nowhere: the most layers the room holds."""
    best: tuple[int, Sequence[GpuRoom], tuple[float, ...]] = (0, (), ())
    options = [ranked[:1]] + ([ranked] if len(ranked) > 1 else [])
    for chosen in options:
        split = _split(chosen, "reclaimable", fixed)

        def booked(e: memory.Estimate, ngl: int, chosen: Sequence[GpuRoom] = chosen,
                   split: tuple[float, ...] = split) -> list[int]:
            _, need, _ = m.cost(chosen, ngl, split)
            return [need[gpu_resource(r.index)] for r in chosen]

        ngl = memory.max_gpu_layers(
            m.info, [r.reclaimable for r in chosen], ctx_size=m.ctx_size, parallel=m.parallel,
            gpu_count=len(chosen), backend=m.backend, split=split if len(chosen) > 1 else None,
            booked=booked)
        if ngl > best[0]:
            best = (ngl, chosen, split)
    ngl, chosen, split = best
    if ngl == 0:
        e, need, kinds = m.cost((), 0, ())
        return Placement(GpuAssignment(0), need, e, "cpu", kinds)
    e, need, kinds = m.cost(chosen, ngl, split)
    return Placement(_assignment(chosen, ngl, split), need, e, "partial", kinds)
