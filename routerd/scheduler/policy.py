"""Which idle models to evict so a new one fits: pure functions, no I/O.

Resources are named byte pools ("ram", "gpu0", "gpu1", ...).  A model's ``need``
says how much of each it holds; the ``budget`` says how much of each routerd may
use.  A resource missing from a budget has a budget of 0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ..units import human_bytes


@dataclass(frozen=True)
class Loaded:
    name: str
    need: Mapping[str, int]  # bytes per resource, e.g. {"ram": ..., "gpu0": ...}
    in_use: int  # active leases
    last_used: float  # monotonic time of the last release (or load)
    pinned: bool  # keep_alive -1: evicted only after every unpinned idle model

    @property
    def size(self) -> int:
        return sum(self.need.values())


def _resources(need: Mapping[str, int], budget: Mapping[str, int]) -> set[str]:
    return set(budget) | {r for r, n in need.items() if n > 0}


def fits_at_all(need: Mapping[str, int], budget: Mapping[str, int]) -> bool:
    """False when the model cannot fit even with every other model evicted."""
    return all(need.get(r, 0) <= budget.get(r, 0) for r in _resources(need, budget))


def eviction_order(loaded: Sequence[Loaded]) -> list[Loaded]:
    """Idle models in the order they may be evicted: unpinned before pinned,
    least recently used first, larger first on ties."""
    idle = [m for m in loaded if m.in_use == 0]
    return sorted(idle, key=lambda m: (m.pinned, m.last_used, -m.size, m.name))


def _shortage(need: Mapping[str, int], loaded: Sequence[Loaded], budget: Mapping[str, int],
              victims: Sequence[Loaded],
              reserved: Mapping[str, int] | None = None) -> dict[str, int]:
    """Bytes missing per resource (only those > 0) once ``victims`` are gone; ``reserved`` is
    memory still held by processes on their way out."""
    gone = {id(v) for v in victims}
    short: dict[str, int] = {}
    for r in _resources(need, budget):
        used = sum(m.need.get(r, 0) for m in loaded if id(m) not in gone)
        used += (reserved or {}).get(r, 0)
        missing = used + need.get(r, 0) - budget.get(r, 0)
        if missing > 0:
            short[r] = missing
    return short


def _fits(need: Mapping[str, int], loaded: Sequence[Loaded], budget: Mapping[str, int],
          victims: Sequence[Loaded], max_loaded: int,
          reserved: Mapping[str, int] | None = None) -> bool:
    if max_loaded > 0 and len(loaded) - len(victims) + 1 > max_loaded:
        return False
    return not _shortage(need, loaded, budget, victims, reserved)


def fits_alongside(need: Mapping[str, int], loaded: Sequence[Loaded],
                   budget: Mapping[str, int], reserved: Mapping[str, int] | None = None) -> bool:
    """Whether ``need`` fits in memory with every loaded model (and ``reserved``) still
    there, the count limit aside: then victims chosen for the count alone may stop while the
    new model loads. Only for resources the budget measures: a resource it does not know
    (a GPU without NVML) never overlaps."""
    measured = set(budget)
    if any(n > 0 and r not in measured for m in loaded for r, n in m.need.items()):
        return False
    if any(n > 0 and r not in measured for r, n in need.items()):
        return False
    return not _shortage(need, loaded, budget, (), reserved)


def choose_victims(need: Mapping[str, int], loaded: Sequence[Loaded], budget: Mapping[str, int],
                   *, max_loaded: int = 0,
                   reserved: Mapping[str, int] | None = None) -> list[Loaded] | None:
    """The idle models to evict, in eviction order, so that ``need`` fits.

    [] when it fits already; None when it cannot fit now (busy models hold the
    room) or at all.  Walks ``eviction_order`` taking only models that help
    (hold a resource still short, or any model while the count limit is
    exceeded), then drops every victim the others make unnecessary, newest
    choice first, so no single victim can be spared."""
    if not fits_at_all(need, budget):
        return None
    victims: list[Loaded] = []
    for cand in eviction_order(loaded):
        if _fits(need, loaded, budget, victims, max_loaded, reserved):
            break
        short = _shortage(need, loaded, budget, victims, reserved)
        over_count = max_loaded > 0 and len(loaded) - len(victims) + 1 > max_loaded
        if over_count or any(cand.need.get(r, 0) > 0 for r in short):
            victims.append(cand)
    if not _fits(need, loaded, budget, victims, max_loaded, reserved):
        return None
    for v in reversed(list(victims)):
        rest = [x for x in victims if x is not v]
        if _fits(need, loaded, budget, rest, max_loaded, reserved):
            victims = rest
    return victims




def resource_label(resource: str) -> str:
    """'ram' -> 'RAM', 'gpu0' -> 'GPU 0 memory'."""
    if resource == "ram":
        return "RAM"
    if resource.startswith("gpu") and resource[3:].isdigit():
        return f"GPU {resource[3:]} memory"
    return resource


def refusal_message(need: Mapping[str, int], budget: Mapping[str, int], model: str = "model") -> str:
    """Why a model can never fit, e.g. 'model needs 3.1 GiB RAM but the budget is 2.0 GiB'."""
    parts = [
        f"{human_bytes(need.get(r, 0), binary=True)} {resource_label(r)} but the budget is "
        f"{human_bytes(budget.get(r, 0), binary=True)}"
        for r in sorted(_resources(need, budget)) if need.get(r, 0) > budget.get(r, 0)
    ]
    if not parts:
        return f"{model} fits the budget"
    return f"{model} needs " + "; and ".join(parts)
