"""Wait for a quiet machine before a round: llama.cpp's spinning threads collapse (seconds per
token) when other work oversubscribes the cores, and such a round measures the neighbours,
not the peers. Bounded: the run goes on, and the report says how many rounds began busy."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass


def _cpu_times() -> tuple[float, float]:
    with open("/proc/stat") as f:
        parts = [float(x) for x in f.readline().split()[1:]]
    idle = parts[3] + (parts[4] if len(parts) > 4 else 0.0)
    return sum(parts), idle


async def busy_fraction(window: float = 0.3) -> float:
    """Share of all cores in use over `window` seconds (the peers are idle between rounds)."""
    t0, i0 = _cpu_times()
    await asyncio.sleep(window)
    t1, i1 = _cpu_times()
    return 1.0 - (i1 - i0) / (t1 - t0) if t1 > t0 else 0.0


@dataclass
class Gate:
    threshold: float = 0.5  # busy share above which a round waits
    max_wait: float = 10.0  # per round
    budget: float = 180.0  # per run
    waited: float = 0.0
    rounds: int = 0
    busy_rounds: int = 0

    async def wait(self) -> None:
        self.rounds += 1
        deadline = time.monotonic() + min(self.max_wait, max(0.0, self.budget - self.waited))
        t0 = time.monotonic()
        while True:
            busy = await busy_fraction()
            if busy <= self.threshold:
                break
            if time.monotonic() >= deadline:
                self.busy_rounds += 1
                break
            await asyncio.sleep(1.0)
        self.waited += time.monotonic() - t0

    def summary(self) -> str:
        return (f"{self.busy_rounds} of {self.rounds} rounds began with more than "
                f"{self.threshold:.0%} of the CPU busy with other work after waiting up to "
                f"{self.max_wait:g} s (waited {self.waited:.0f} s in all)")


GATE = Gate()
