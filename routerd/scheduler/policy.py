"""Which idle models to evict so a new one fits: pure functions, no I/O.

Resources are named byte pools ("ram", "gpu0", "gpu1", ...).  A model's ``need``
says how much of each it holds; the ``budget`` says how much of each routerd may
use.  A resource missing from a budget has a budget of 0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..units import human_bytes


@dataclass(frozen=True)
class Loaded:
    name: str
    need: Mapping[str, int]  # bytes per resource, e.g. {"ram": ..., "gpu0": ...}
    in_use: int  # active leases
    last_used: float  # monotonic time of the last release (or load)
    pinned: bool  # keep_alive -1: evicted only after every unpinned idle model
    load_seconds: float = 0.0  # its last measured load time; 0 = not measured

    @property
    def size(self) -> int:
        return sum(self.need.values())


def _resources(need: Mapping[str, int], budget: Mapping[str, int]) -> set[str]:
    return set(budget) | {r for r, n in need.items() if n > 0}


def fits_at_all(need: Mapping[str, int], budget: Mapping[str, int]) -> bool:
    """False when the model cannot fit even with every other model evicted."""
    return all(need.get(r, 0) <= budget.get(r, 0) for r in _resources(need, budget))


# A model's load time is measured once it is loaded; until then it is guessed from its size
# (reading the file at about 1 GiB/s, plus the engine's start).
GUESS_START_S, GUESS_BYTES_PER_S = 0.5, float(1 << 30)


def reload_cost(m: Loaded) -> float:
    """Seconds it would take to load `m` again: its measured load time, else a size guess."""
    if m.load_seconds > 0:
        return m.load_seconds
    return GUESS_START_S + m.size / GUESS_BYTES_PER_S


def eviction_score(m: Loaded, now: float) -> float:
    """Idle seconds per second of reload (Lemonade's idle / load-time score): a model long
    idle and cheap to load again scores high and goes first."""
    return max(now - m.last_used, 0.0) / max(reload_cost(m), 0.05)


def _order_key(now: float | None) -> Any:
    if now is None:  # no clock given: least recently used first
        return lambda m: (m.pinned, m.last_used, -m.size, m.name)
    return lambda m: (m.pinned, -eviction_score(m, now), -m.size, m.name)


def eviction_order(loaded: Sequence[Loaded], now: float | None = None) -> list[Loaded]:
    """Idle models in the order they may be evicted: unpinned before pinned, then by
    `eviction_score` at `now` (without `now`: least recently used first), larger first on
    ties."""
    idle = [m for m in loaded if m.in_use == 0]
    return sorted(idle, key=_order_key(now))


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
                   *, max_loaded: int = 0, reserved: Mapping[str, int] | None = None,
                   now: float | None = None) -> list[Loaded] | None:
    """The idle models to evict, in eviction order, so that ``need`` fits.

    [] when it fits already; None when it cannot fit now (busy models hold the
    room) or at all.  Walks ``eviction_order`` taking only models that help
    (hold a resource still short, or any model while the count limit is
    exceeded), then drops every victim the others make unnecessary, newest
    choice first, so no single victim can be spared."""
    if not fits_at_all(need, budget):
        return None
    return _pick(need, loaded, budget, eviction_order(loaded, now), max_loaded, reserved)


def blockers(need: Mapping[str, int], loaded: Sequence[Loaded], budget: Mapping[str, int],
             *, max_loaded: int = 0, reserved: Mapping[str, int] | None = None,
             now: float | None = None) -> list[Loaded]:
    """The busy models that keep ``need`` out: those that would have to go too once every
    idle model has gone (busy ones taken in the same order as idle ones). [] when idle models
    are enough, or when ``need`` can never fit."""
    if not fits_at_all(need, budget):
        return []
    key = _order_key(now)
    idle = sorted((m for m in loaded if m.in_use == 0), key=key)
    busy = sorted((m for m in loaded if m.in_use > 0), key=key)
    picked = _pick(need, loaded, budget, idle + busy, max_loaded, reserved)
    return [m for m in picked or () if m.in_use > 0]


def _pick(need: Mapping[str, int], loaded: Sequence[Loaded], budget: Mapping[str, int],
          order: Sequence[Loaded], max_loaded: int,
          reserved: Mapping[str, int] | None) -> list[Loaded] | None:
    victims: list[Loaded] = []
    for cand in order:
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


def may_overtake(overtaken: int, since: float, now: float, *, requests: int, wait: float,
                 resident_until: float = 0.0) -> bool:
    """Whether one more request for a loaded model may be served ahead of a load that waits
    for that model's room (`swap_batch`): `overtaken` requests that came after the waiting
    load (asked at `since`) have gone ahead so far; at most `requests` may, and only within
    `wait` seconds. Until `resident_until` (`min_resident` after this model displaced the
    waiting one) they always may."""
    if now < resident_until:
        return True
    return overtaken < requests and now - since < wait


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
