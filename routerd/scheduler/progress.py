"""How far a model's load has come, as a fraction: pure, from what the engine printed and the
time it has taken so far against the model's last measured load time.

llama-server prints no percentage at its default verbosity, but its load goes through phases
it names (reading the GGUF header, mapping the tensors, the KV cache, the warm-up run, the
slots); llama.cpp's progress dots (a line of `.`, one per percent) count when they show.
Without a phase line, or past it, the elapsed share of the last measured load time counts
(capped below 1: only the engine's readiness ends a load); a model never measured gets a
curve that approaches 0.9 as the seconds go by.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

_PHASES: tuple[tuple[re.Pattern[str], float], ...] = tuple(
    (re.compile(p), f) for p, f in (
        (r"llama_model_loader: loaded meta data", 0.05),
        (r"load_tensors:", 0.3),
        (r"llama_context:|llama_kv_cache", 0.6),
        (r"threadpool init|sched_reserve", 0.7),
        (r"warming up the model", 0.75),
        (r"load_model: initializing|srv +init:", 0.9),
        (r"model loaded|all slots are idle", 0.99),
    ))
_DOTS = re.compile(r"^\.{2,}\s*$")
TIMED_CAP = 0.95  # elapsed time alone never says a load is done
UNMEASURED_HALF_S = 10.0  # a never-measured model is "half way" after this long


def from_output(lines: Iterable[str]) -> float:
    """The furthest phase the engine's output names (0 when it names none)."""
    best = 0.0
    for line in lines:
        if _DOTS.match(line):
            best = max(best, min(line.count(".") / 100.0, 1.0))
            continue
        for pattern, fraction in _PHASES:
            if fraction > best and pattern.search(line):
                best = fraction
    return best


def from_time(elapsed: float, expected: float | None) -> float:
    if elapsed <= 0:
        return 0.0
    if expected and expected > 0:
        return min(elapsed / expected, TIMED_CAP)
    return 0.9 * elapsed / (elapsed + UNMEASURED_HALF_S)


def load_progress(lines: Iterable[str], elapsed: float, expected: float | None) -> float:
    """The load's progress in [0, 0.99]: the engine's own phase or the elapsed share of the
    expected load time, whichever is further."""
    return round(min(max(from_output(lines), from_time(elapsed, expected)), 0.99), 3)
