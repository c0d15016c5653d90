"""The books for a model whose layers run on llama.cpp rpc-servers (a model's `rpc:`).

llama-server with `--rpc` sees each remote device as one more GPU-like device; routerd starts
it with every layer offloaded (-ngl all, or the model's gpu_layers) and no local GPU
(CUDA_VISIBLE_DEVICES empty), so llama.cpp splits the layers over the remote devices in
proportion to their free memory, as it does when no tensor split is given. The estimate is
`memory.estimate` over those devices (the same per-layer placement as for local GPUs) less the
CUDA context a local GPU would cost (the remote process holds its own, in what it reports):

- "ram": what stays on this host: the token embeddings, the host side of the graph, the
  engine itself; measured after the load like any worker's RAM;
- "rpc:<host:port>": the weights, KV cache and compute buffers on that server's devices, as
  estimated (routerd cannot measure them: the server has one client at a time, the engine);
- "rpc:<host:port>/client": 1 — an rpc-server serves one client at a time, so two loaded
  models can never share one; the policy evicts the idle one holding it, or waits.

The budget of "rpc:<host:port>" is the free memory the server reported (GET_DEVICE_MEMORY,
summed over its devices) when it was last probed, which is only when no model of ours was
connected to it (at a load decision); an endpoint never reached has no budget, so a model
naming it is refused with the reason.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import structlog

from ..store.gguf import GGUFInfo
from ..workers import rpc
from ..workers.backends import GpuAssignment, LaunchSpec
from . import memory, placement

log = structlog.get_logger(__name__)

Probe = Callable[[str], Sequence[rpc.DeviceMemory]]
RETRY_AFTER = 5  # seconds, for a request whose rpc-server is down or busy
Correct = Callable[[str, int], float]


def resource(endpoint: str) -> str:
    return f"rpc:{endpoint}"


def client_resource(endpoint: str) -> str:
    return f"rpc:{endpoint}/client"


def is_remote(res: str) -> bool:
    return res.startswith("rpc:")


def endpoints_held(needs: Iterable[Mapping[str, int]]) -> set[str]:
    """The endpoints these bookings hold a client connection to."""
    out = set()
    for need in needs:
        for res, n in need.items():
            if n > 0 and res.startswith("rpc:") and res.endswith("/client"):
                out.add(res[4:-len("/client")])
    return out


def remote_part(booked: Mapping[str, int]) -> dict[str, int]:
    return {r: n for r, n in booked.items() if is_remote(r)}


@dataclass(frozen=True)
class RpcPlacement(placement.Placement):
    """A placement whose device layers are on rpc-servers; `raw` includes them."""

    remote_raw: Mapping[str, int] = field(default_factory=dict)

    @property
    def raw(self) -> dict[str, int]:
        return {"ram": self.estimate.ram, **self.remote_raw}


class RpcDevices:
    """The memory each rpc-server reported, by endpoint; probed only when asked."""

    def __init__(self, probe: Probe | None = None) -> None:
        self._probe = probe or rpc.probe
        self._seen: dict[str, tuple[rpc.DeviceMemory, ...]] = {}
        self.errors: dict[str, str] = {}

    def refresh(self, endpoints: Iterable[str], held: set[str]) -> None:
        """Probe each endpoint no model of ours is connected to (a probe blocks for at most
        rpc.PROBE_TIMEOUT; a held one would not answer)."""
        for e in endpoints:
            if e in held:
                continue
            try:
                devices = tuple(self._probe(e))
            except rpc.RpcError as err:
                log.warning("rpc.probe_failed", endpoint=e, error=err.message)
                self.errors[e] = err.message
                self._seen.pop(e, None)
                continue
            self.errors.pop(e, None)
            self._seen[e] = devices
            log.info("rpc.probed", endpoint=e, devices=len(devices),
                     free=[d.free for d in devices], total=[d.total for d in devices])

    def require(self, endpoints: Iterable[str]) -> None:
        """RpcError (503, Retry-After) naming the first endpoint the last probe failed for:
        loading would fail (unreachable) or hang (serving another client)."""
        for e in endpoints:
            if e not in self._seen and e in self.errors:
                raise rpc.RpcError(f"cannot load over RPC: {self.errors[e]}",
                                   headers={"Retry-After": str(RETRY_AFTER)})

    def devices(self, endpoint: str) -> tuple[rpc.DeviceMemory, ...]:
        return self._seen.get(endpoint, ())

    def budget(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for e, devices in self._seen.items():
            out[resource(e)] = sum(d.free for d in devices)
            out[client_resource(e)] = 1
        return out


def measure_kind(ls: LaunchSpec, n_dev: int, ngl: int) -> str:
    """Local RAM of a run over rpc devices: its own MeasurementBook entry ("ram@..." shares
    the ratio family of RAM with offloaded layers)."""
    return f"ram@rpc{n_dev}:ngl{ngl}"


def place(info: GGUFInfo, ls: LaunchSpec, devices: RpcDevices,
          correct: Correct) -> RpcPlacement:
    """Where the model goes: layers over the endpoints' devices, booked per endpoint."""
    slots: list[tuple[str, float]] = []  # (endpoint, share) per remote device, in order
    for ep in ls.rpc:
        found = devices.devices(ep) or (rpc.DeviceMemory(0, 0),)  # unknown: one device
        slots += [(ep, float(d.free)) for d in found]
    split = [round(max(f, memory.MiB) / memory.MiB, 1) for _, f in slots]
    if not any(f for _, f in slots):
        split = [1.0] * len(slots)
    n_all = len(info.layer_bytes) + 1
    ngl = n_all if ls.gpu_layers is None or ls.gpu_layers < 0 else min(ls.gpu_layers, n_all)
    e = memory.estimate(info, ctx_size=ls.ctx_size, parallel=ls.parallel, gpu_layers=ngl,
                        gpu_count=len(slots), backend=ls.backend,
                        split=split if len(slots) > 1 else None)
    remote: dict[str, int] = {}
    for (endpoint, _), n in zip(slots, e.per_gpu):
        if n > 0:
            n -= memory.GPU_CONTEXT  # no local CUDA context for a remote device
        remote[resource(endpoint)] = remote.get(resource(endpoint), 0) + max(n, 0)
    kind = measure_kind(ls, len(slots), ngl)
    need = {"ram": int(correct(kind, e.ram)), **remote}
    need.update({client_resource(ep): 1 for ep in ls.rpc})
    raw = {**remote, **{client_resource(ep): 1 for ep in ls.rpc}}
    return RpcPlacement(GpuAssignment(gpu_layers=ngl, devices=()), need, e, "rpc",
                        {"ram": kind}, remote_raw=raw)
