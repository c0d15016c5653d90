"""How much memory a model will take, and how much the machine has.

``estimate`` works from GGUF metadata before a worker starts, per device for a given
-ngl and tensor split (``layer_devices`` follows llama.cpp's layer assignment);
``max_gpu_layers`` is ``gpu_layers: auto`` for a room (placement.py picks the GPUs); the
probes measure the machine and running workers (GPUs: gpus.py); ``MeasurementBook``
remembers what workers really used so the next estimate for the same model is the
measured figure.

Constants were calibrated against the vendored llama.cpp (llama-cpp-python 0.3.36)
on CPU with SmolLM2-135M (bench/memory_estimate.py); GPU constants follow Ollama and
have not been checked on a GPU yet (scripts/gpu-check.sh measures them).
"""

from __future__ import annotations

import contextlib
import json
import os
import bisect
import re
import statistics
import struct
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil
import structlog

from routerd.store.gguf import GGUFInfo

from ..config import ModelConfig
from .gpus import GpuDevice, GpuProbe  # noqa: F401 - re-exported: their old home

log = structlog.get_logger(__name__)

MiB = 1 << 20
BYTES_PER_ELEMENT = {
    "f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q5_1": 24 / 32,
    "q5_0": 22 / 32, "q4_1": 20 / 32, "q4_0": 18 / 32, "iq4_nl": 18 / 32,
}
# Process baseline beyond llama.cpp's own buffers (binary, libs, tokenizer tables,
# HTTP threads; for the Python worker: the interpreter, aiohttp and llama_cpp).
OVERHEAD = {"llama-server": 36 * MiB, "llamafile": 40 * MiB, "llama-cpp-python": 100 * MiB}
DEFAULT_OVERHEAD = 100 * MiB
# Per GPU a process uses: CUDA context, cuBLAS workspace. Not in llama.cpp's logs;
# Ollama reserves 457 MiB per CUDA device (CudaGPUInfo.MinimumMemory).
GPU_CONTEXT = 457 * MiB
UBATCH = 512  # llama.cpp's default -ub
ONE_SEQUENCE = frozenset({"llama-cpp-python"})
# Flash attention is on by default ("auto") in llama-server; routerd's own worker
# turns it on only with -fa; llamafile's older llama.cpp has it off.
FLASH_ATTN_DEFAULT = {"llama-server": True, "llamafile": False, "llama-cpp-python": False}


@dataclass(frozen=True)
class Estimate:
    ram: int
    vram: int
    weights: int
    kv: int
    compute: int
    overhead: int
    per_gpu: tuple[int, ...] = ()  # vram split over the GPUs used, sums to vram

    @property
    def total(self) -> int:
        return self.ram + self.vram

    def need(self, gpu_indices: Iterable[int] = ()) -> dict[str, int]:
        """Bytes per resource for policy.choose_victims: {"ram": .., "gpu0": ..}."""
        out = {"ram": self.ram}
        out.update({f"gpu{i}": b for i, b in zip(gpu_indices, self.per_gpu)})
        return out


def _pad(n: int, to: int) -> int:
    return -(-n // to) * to


def kv_cells(ctx_size: int, parallel: int, *, unified: bool = False) -> tuple[int, int]:
    """(total cells, cells per sequence) as llama.cpp sizes the KV cache.

    llama-server's -c is the TOTAL context shared by the -np slots: llama_context
    pads n_ctx to 256; with kv_unified every slot sees all n_ctx cells, otherwise
    each of the n_seq_max = np sequences gets pad(n_ctx / np, 256) and n_ctx
    becomes n_ctx_seq * np (llama-context.cpp, vendored 0.3.36). Either way the
    KV cache scales with -c, not with -c x -np (measured: -c 8192 -np 1 and -np 4
    both give a 180 MiB KV buffer for SmolLM2). routerd passes -np explicitly,
    which leaves kv_unified off (it is only on by default for -np auto)."""
    n_ctx = _pad(max(ctx_size, 1), 256)
    if unified or parallel <= 1:
        return n_ctx, n_ctx
    per_seq = _pad(max(n_ctx // parallel, 1), 256)
    return per_seq * parallel, per_seq


def kv_bytes(info: GGUFInfo, cells: int, cache_type_k: str = "f16",
             cache_type_v: str = "f16") -> int:
    """n_layer x n_head_kv x (head_dim_k x bpe_k + head_dim_v x bpe_v) x cells."""
    bk, bv = _bpe(cache_type_k), _bpe(cache_type_v)
    per_cell = info.n_head_kv * (info.head_dim_k * bk + info.head_dim_v * bv)
    return int(info.n_layer * per_cell * cells)


def _bpe(cache_type: str) -> float:
    try:
        return BYTES_PER_ELEMENT[cache_type.lower()]
    except KeyError:
        raise ValueError(f"unknown KV cache type {cache_type!r}; "
                         f"known: {', '.join(BYTES_PER_ELEMENT)}") from None


def compute_bytes(info: GGUFInfo, n_ctx_seq: int, parallel: int, *, flash_attn: bool,
                  ubatch: int = UBATCH, n_outputs: int = 1) -> int:
    """llama.cpp's compute buffer (the worst-case graph for one ubatch) + output buffer.

    Fitted to the vendored llama.cpp's `sched_reserve: CPU compute buffer size`
    (bench/memory_estimate.py); the graph allocator reuses memory, so the buffer is
    the largest of:
    - the FFN scratch, 3 x n_ff + 4 x n_embd floats per token, plus with flash
      attention the f16 KQ mask (n_ctx_seq x ubatch);
    - without flash attention, the f32 KQ scores of all heads and the f32 mask;
    - the logits of the outputs the graph is reserved for: 1 per slot for
      llama-server, the whole ubatch for llama-cpp-python (n_outputs_max = n_batch).
    The output buffer holds one row of logits per sequence. These buffers are
    reserved up front; they become resident as the context fills."""
    ub = min(ubatch, n_ctx_seq * max(parallel, 1))
    ffn = ub * 4 * (3 * info.n_ff + 4 * info.n_embd)
    if flash_attn:
        attn = n_ctx_seq * ub * 2
    else:
        attn = n_ctx_seq * ub * 4 * (max(info.n_head, 1) + 1) + ub * 4 * (info.n_ff + 3 * info.n_embd)
    logits = min(n_outputs, ub) * info.n_vocab * 4 + ub * 4 * 3 * info.n_embd
    graph = max(ffn + attn, logits) if flash_attn else max(ffn, attn, logits)
    return graph + max(parallel, 1) * info.n_vocab * 4


def _f32(x: float) -> float:
    """x rounded to a C float, as llama.cpp computes its split points."""
    return float(struct.unpack("<f", struct.pack("<f", x))[0])


def offloaded(n_layer: int, gpu_layers: int | None) -> int:
    """llama.cpp's act_gpu_layers: how many of the n_layer + 1 layers (the output layer
    counts as one) go to the GPUs; None or negative means all (-ngl all)."""
    if gpu_layers is None or gpu_layers < 0:
        return n_layer + 1
    return min(gpu_layers, n_layer + 1)


def layer_devices(n_layer: int, gpu_layers: int | None,
                  split: Sequence[float]) -> tuple[int | None, ...]:
    """Where llama.cpp puts layers 0..n_layer-1 and the output layer (index n_layer): a
    position in ``split`` (the devices it was given, in order), or None for the CPU.

    The vendored llama.cpp (llama-model.cpp, load_tensors) offloads the LAST ``gpu_layers``
    of the n_layer + 1, so the output layer goes first (i_gpu_start = n_layer + 1 - ngl);
    over several devices it cuts them into contiguous runs at the cumulative proportions of
    the tensor split (upper_bound of (il - i_gpu_start) / ngl). Token embeddings stay on CPU."""
    n_dev = len(split)
    if n_dev == 0:
        return (None,) * (n_layer + 1)
    ngl = offloaded(n_layer, gpu_layers)
    start = n_layer + 1 - ngl
    total = sum(split) or float(n_dev)
    weights = split if sum(split) else [1.0] * n_dev
    cum, acc = [], 0.0
    for w in weights:
        acc = _f32(acc + w)
        cum.append(_f32(acc / total))
    out: list[int | None] = []
    for il in range(n_layer + 1):
        if il < start:
            out.append(None)
            continue
        x = _f32((il - start) / ngl)
        out.append(min(bisect.bisect_right(cum, x), n_dev - 1))
    return tuple(out)


def weight_split(info: GGUFInfo, gpu_layers: int | None, gpu_count: int) -> tuple[int, int, int]:
    """(weight bytes in RAM, weight bytes on GPUs, layers offloaded counting the output layer)
    as the vendored llama.cpp places them (see layer_devices). Without a GPU all is in RAM."""
    ram, per_dev, _, _ = _weights(info, layer_devices(
        len(info.layer_bytes), gpu_layers, (1.0,) * max(gpu_count, 0)), max(gpu_count, 0))
    n = 0 if gpu_count <= 0 else offloaded(len(info.layer_bytes), gpu_layers)
    return ram, sum(per_dev), n


def _weights(info: GGUFInfo, devs: Sequence[int | None],
             n_dev: int) -> tuple[int, list[int], list[int], bool]:
    """(RAM weight bytes, weight bytes per device, repeating layers per device, output on CPU)."""
    n_layer = len(info.layer_bytes)
    per_dev, layers = [0] * n_dev, [0] * n_dev
    ram = info.input_bytes
    for il, b in enumerate(info.layer_bytes):
        d = devs[il]
        if d is None:
            ram += b
        else:
            per_dev[d] += b
            layers[d] += 1
    # A tied output head is token_embd itself: counted in input_bytes already, and copied
    # to the GPU only when the output layer is offloaded.
    shared = max(info.input_bytes + sum(info.layer_bytes) + info.output_bytes
                 - info.tensor_bytes, 0)
    out_dev = devs[n_layer]
    if out_dev is None:
        ram += info.output_bytes - shared
    else:
        per_dev[out_dev] += info.output_bytes
    return ram, per_dev, layers, out_dev is None


def estimate(info: GGUFInfo, *, ctx_size: int, parallel: int, gpu_layers: int | None,
             gpu_count: int, cache_type_k: str = "f16", cache_type_v: str = "f16",
             backend: str, flash_attn: bool | None = None, ubatch: int = UBATCH,
             split: Sequence[float] | None = None) -> Estimate:
    """Expected resident memory of one worker once loaded and warmed up.

    ctx_size 0 means the model's trained context, as llama-server does. ``split`` is the
    tensor split over the ``gpu_count`` devices (proportions; None = even)."""
    fa = FLASH_ATTN_DEFAULT.get(backend, True) if flash_attn is None else flash_attn
    # routerd's own worker runs one llama.cpp sequence whatever -np says; its
    # graph is reserved for logits of every ubatch token (see compute_bytes).
    seqs = 1 if backend in ONE_SEQUENCE else parallel
    cells, per_seq = kv_cells(ctx_size or info.context_length or ModelConfig.ctx_size, seqs)
    kv = kv_bytes(info, cells, cache_type_k, cache_type_v)
    # GPU buffers are allocated in full; in RAM only touched pages count, and the
    # Python worker's reserved logits for a whole ubatch are never written (it
    # asks llama.cpp for the last token's logits only).
    compute_ram = compute_bytes(info, per_seq, seqs, flash_attn=fa, ubatch=ubatch, n_outputs=seqs)
    compute_gpu = compute_bytes(info, per_seq, seqs, flash_attn=fa, ubatch=ubatch,
                                n_outputs=seqs if backend == "llama-server" else ubatch)
    overhead = OVERHEAD.get(backend, DEFAULT_OVERHEAD)
    n_dev = max(gpu_count, 0) if split is None else len(split)
    shares = tuple(split) if split is not None else (1.0,) * n_dev
    n_layer = len(info.layer_bytes)
    devs = layer_devices(n_layer, gpu_layers if n_dev else 0, shares)
    w_ram, w_dev, layers, _ = _weights(info, devs, n_dev)
    ram = w_ram + overhead
    if n_dev > 0 and any(d is not None for d in devs):
        kv_dev = [kv * n // max(n_layer, 1) for n in layers]  # KV lives with its layer
        ram += kv - sum(kv_dev)
        # The host keeps the embeddings' scratch and the output buffer; layers left on the
        # CPU need the CPU graph too.
        cpu_layers = n_layer - sum(layers)
        ram += compute_ram if cpu_layers else ubatch * 4 * 2 * info.n_embd + seqs * info.n_vocab * 4
        per_gpu = tuple(w + k + compute_gpu + GPU_CONTEXT for w, k in zip(w_dev, kv_dev))
        compute = compute_gpu
    else:
        # -ngl 0 with a GPU build still creates a CUDA context on each device it sees.
        per_gpu = tuple(GPU_CONTEXT for _ in range(n_dev))
        ram += kv + compute_ram
        compute = compute_ram
    return Estimate(ram=ram, vram=sum(per_gpu), weights=w_ram + sum(w_dev), kv=kv,
                    compute=compute, overhead=overhead, per_gpu=per_gpu)


def max_gpu_layers(info: GGUFInfo, vram_per_gpu: int | Sequence[int], *, ctx_size: int,
                   parallel: int, gpu_count: int, backend: str, cache_type_k: str = "f16",
                   cache_type_v: str = "f16", split: Sequence[float] | None = None,
                   booked: Callable[[Estimate, int], Sequence[int]] | None = None) -> int:
    """``gpu_layers: auto``: the most layers (n_layer + 1 = all, output layer included) whose
    estimate fits every GPU's room (one figure for all, or one per device); 0 when not even
    one fits. ``booked`` turns an estimate for ngl layers into the bytes per GPU to book
    (the placement's measured correction); by default the estimate itself. The figure grows
    with every layer, so a binary search finds it."""
    if gpu_count <= 0:
        return 0
    rooms = ([vram_per_gpu] * gpu_count if isinstance(vram_per_gpu, int)
             else list(vram_per_gpu))

    def fits(ngl: int) -> bool:
        e = estimate(info, ctx_size=ctx_size, parallel=parallel, gpu_layers=ngl,
                     gpu_count=gpu_count, backend=backend, cache_type_k=cache_type_k,
                     cache_type_v=cache_type_v, split=split)
        per_gpu = booked(e, ngl) if booked is not None else e.per_gpu
        return all(n <= room for n, room in zip(per_gpu, rooms))

    lo, hi = 0, len(info.layer_bytes) + 1  # fits(lo) is assumed; find the largest
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


# --- engine logs ---------------------------------------------------------------------

# Vendored llama.cpp wording (verbosity >= 4, i.e. llama-server -lv 4), e.g.
#   load_tensors:   CPU_Mapped model buffer size =    92.10 MiB
#   llama_context:        CPU  output buffer size =     0.19 MiB
#   llama_kv_cache:        CPU KV buffer size =    45.00 MiB
#   sched_reserve:        CPU compute buffer size =    15.51 MiB
# and older llama.cpp (llamafile): "llm_load_tensors:        CPU buffer size = 92.10 MiB".
_BUFFER_RE = re.compile(
    r"(?P<name>[A-Za-z][\w.\-]*)\s+(?:(?P<kind>model|KV|RS|output|compute|LoRA)\s+)?"
    r"buffer size\s*=\s*(?P<mib>\d+(?:\.\d+)?)\s*MiB")
_KINDS = {None: "model", "model": "model", "KV": "kv", "RS": "rs", "output": "output",
          "compute": "compute", "LoRA": "lora"}


def parse_engine_buffers(lines: Iterable[str]) -> dict[str, dict[str, int]]:
    """{kind: {buffer: bytes}} from llama.cpp log lines; kinds: model, kv, rs,
    output, compute, lora. Repeated lines for one buffer (an iSWA model's two KV
    caches) are summed."""
    out: dict[str, dict[str, int]] = {}
    for line in lines:
        m = _BUFFER_RE.search(line)
        if not m:
            continue
        kind = _KINDS[m.group("kind")]
        per = out.setdefault(kind, {})
        per[m.group("name")] = per.get(m.group("name"), 0) + int(float(m.group("mib")) * MiB)
    return out


def is_host_buffer(name: str) -> bool:
    """CPU, CPU_Mapped, CPU_REPACK, CUDA_Host (pinned host memory) live in RAM."""
    return name.upper().startswith("CPU") or name.endswith("_Host")


def buffer_totals(buffers: dict[str, dict[str, int]]) -> tuple[int, int]:
    """(host bytes, device bytes) over everything parse_engine_buffers found."""
    host = dev = 0
    for per in buffers.values():
        for name, n in per.items():
            if is_host_buffer(name):
                host += n
            else:
                dev += n
    return host, dev


# --- probes --------------------------------------------------------------------------

class RamProbe:
    """System RAM, honouring a cgroup v2 limit when one is set."""

    def __init__(self, cgroup_dir: str | Path = "/sys/fs/cgroup") -> None:
        self._cgroup = Path(cgroup_dir)

    def _cgroup_value(self, name: str) -> int | None:
        try:
            text = (self._cgroup / name).read_text().strip()
        except OSError:
            return None
        return int(text) if text.isdigit() else None

    def total(self) -> int:
        limit = self._cgroup_value("memory.max")
        total = psutil.virtual_memory().total
        return min(total, limit) if limit else total

    def available(self) -> int:
        avail = psutil.virtual_memory().available
        limit, current = self._cgroup_value("memory.max"), self._cgroup_value("memory.current")
        if limit and current is not None:
            avail = min(avail, max(limit - current, 0))
        return avail


def measure_tree(pid: int) -> int:
    """Resident bytes of a process and all its descendants; 0 if it is gone.

    Processes that exit while being measured are skipped, not an error."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return total


# --- measurements --------------------------------------------------------------------

@dataclass(frozen=True)
class MeasureKey:
    path: str
    size: int
    mtime_ns: int
    ctx: int
    parallel: int
    backend: str

    @classmethod
    def for_file(cls, path: str | Path, *, ctx: int, parallel: int, backend: str) -> MeasureKey:
        st = os.stat(path)
        return cls(os.fspath(path), st.st_size, st.st_mtime_ns, ctx, parallel, backend)

    def text(self, resource: str) -> str:
        return f"{self.backend}|{resource}|{self.ctx}|{self.parallel}|{self.size}|{self.mtime_ns}|{self.path}"


def _family(resource: str) -> str:
    """Which figures share a measured/estimated ratio: 'ram' (CPU runs), 'ram@gpu' (RAM of a
    run with GPU layers), 'vram' (any layer count or split), else the resource itself."""
    base, sep, _ = resource.partition("@")
    if not sep:
        return base
    return "ram@gpu" if base == "ram" else base


class MeasurementBook:
    """Measured bytes per (model file, ctx, parallel, backend, resource), kept as JSON.

    ``correct`` answers with the measured figure when there is one, else scales
    the estimate by the median measured/estimated ratio seen for the backend."""

    MIN_RATIO, MAX_RATIO = 0.5, 3.0

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._entries: dict[str, dict[str, int | str]] = self._load()
        self._failed = ""  # the last write error, logged once until a write succeeds

    def _load(self) -> dict[str, dict[str, int | str]]:
        try:
            data = json.loads(self.path.read_text())
            entries = data["entries"]
            if not isinstance(entries, dict):
                raise ValueError("entries is not an object")
            return entries
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("memory.book_unreadable", path=str(self.path), error=str(e))
            return {}

    def record(self, key: MeasureKey, measured: int, estimated: int, resource: str = "ram") -> None:
        """Keep the high-water mark: a worker grows as its context fills (KV and
        compute pages are touched lazily), so the largest figure seen is the one to book."""
        text = key.text(resource)
        old = self._entries.get(text)
        peak = max(int(measured), int(old["measured"]) if old else 0)
        if old and peak == int(old["measured"]) and int(old["estimated"]) == int(estimated):
            return
        self._entries[text] = {"backend": key.backend, "resource": resource,
                               "measured": peak, "estimated": int(estimated)}
        self._save()

    def measured(self, key: MeasureKey, resource: str = "ram") -> int | None:
        e = self._entries.get(key.text(resource))
        return int(e["measured"]) if e else None

    def correct(self, key: MeasureKey, estimate: int, resource: str = "ram") -> int:
        known = self.measured(key, resource)
        if known is not None:
            return known
        family = _family(resource)
        ratios = [int(e["measured"]) / int(e["estimated"]) for e in self._entries.values()
                  if e.get("backend") == key.backend and _family(str(e.get("resource"))) == family
                  and int(e.get("estimated", 0)) > 0]
        if not ratios:
            return estimate
        ratio = min(max(statistics.median(ratios), self.MIN_RATIO), self.MAX_RATIO)
        return int(estimate * ratio)

    def _save(self) -> None:
        """Write the book; a state_dir that cannot take it (full, read-only, not a folder)
        costs the figures' persistence, never the request that measured them: the figures
        stay in memory and one warning per distinct error says what failed."""
        try:
            self._write()
        except OSError as e:
            if str(e) != self._failed:
                log.warning("memory.book_write_failed", path=str(self.path), error=str(e))
            self._failed = str(e)
            return
        if self._failed:
            log.info("memory.book_written", path=str(self.path))
            self._failed = ""

    def _write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".memory-", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump({"version": 1, "entries": self._entries}, f, indent=1, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        with contextlib.suppress(OSError):
            dfd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)

