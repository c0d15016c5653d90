"""Where a request for a model served at several places goes: a pure function over views.

    choice = choose([Place("local", local=True, loaded=True, slots=2, inflight=2, fits=False),
                     Place("b", loaded=True, slots=1, inflight=0, fits=False)])   # → "b"

The order (the issue's, llama-swap's spill-over, Paddler's slot-aware balancing):
1. loaded with a free slot: the least busy of them (in-flight per slot, per unit of weight);
2. else loaded with the shortest queue, unless that queue is a whole round deep (as many
   waiting as the place has slots) and some place can load it without evicting: then spill
   over there;
3. else a place where it fits without evicting;
4. else a local load (the scheduler makes room), or, with no local copy, the least busy place.
Ties go to the local copy, then by key, so the choice is stable. In-flight counts are
routerd's own (leases it handed out), never a peer's word; a place routerd has requests in
flight at counts as loaded (they are loading it there), so a spill-over goes to one new place
at a time and does not send everything to a place whose poll still says "not loaded".
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence


@dataclass(frozen=True)
class Place:
    key: str  # "local" or the peer's name
    local: bool = False
    loaded: bool = False
    slots: int = 1  # parallel requests it serves at once (1 when it does not say)
    inflight: int = 0  # requests routerd has sent there and not finished
    fits: bool = False  # could load the model without evicting another
    weight: float = 1.0


def _busy(p: Place) -> float:
    return p.inflight / (max(p.slots, 1) * p.weight)


def _queue(p: Place) -> int:
    return max(0, p.inflight - max(p.slots, 1) + 1)


def _tie(p: Place) -> tuple[bool, str]:
    return (not p.local, p.key)


def choose(places: Sequence[Place]) -> Place | None:
    """The place for the next request (one of `places`); None when there is none."""
    seen = [replace(p, loaded=True) if p.inflight and not p.loaded else p for p in places]
    chosen = _choose(seen)
    return None if chosen is None else places[seen.index(chosen)]


def _choose(places: Sequence[Place]) -> Place | None:
    if not places:
        return None
    free = [p for p in places if p.loaded and p.inflight < max(p.slots, 1)]
    if free:
        return min(free, key=lambda p: (_busy(p), *_tie(p)))
    fits = [p for p in places if not p.loaded and p.fits]
    loaded = [p for p in places if p.loaded]
    if loaded:
        best = min(loaded, key=lambda p: (_queue(p) / p.weight, *_tie(p)))
        if fits and _queue(best) >= max(best.slots, 1):
            return min(fits, key=lambda p: (-p.weight, *_tie(p)))
        return best
    if fits:
        return min(fits, key=lambda p: (-p.weight, *_tie(p)))
    local = [p for p in places if p.local]
    if local:
        return local[0]
    return min(places, key=lambda p: (_busy(p), *_tie(p)))
