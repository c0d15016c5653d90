"""The liveness prober's kill decision: a missed probe kills a silent worker, not one whose
output kept flowing while the probe was out."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from routerd.scheduler.supervision import Prober


class _Scheduler:
    def __init__(self) -> None:
        self.killed: list[str] = []

    async def kill_hung(self, runner: Any, reason: str) -> None:
        self.killed.append(reason)


def _prober(flows: bool, answer: str | None) -> tuple[Prober, _Scheduler, Any]:
    sched = _Scheduler()
    runner = SimpleNamespace(name="m", worker=SimpleNamespace(progress=0, pid=1, inflight=3))
    prober = Prober(sched, session=None, interval=1, timeout=1)  # type: ignore[arg-type]

    async def check(r: Any) -> str | None:
        if flows:  # chunks relayed while the probe waited
            r.worker.progress += 5
        return answer

    prober.check = check  # type: ignore[method-assign]
    return prober, sched, runner


async def test_missed_probe_kills_a_silent_worker() -> None:
    prober, sched, runner = _prober(flows=False, answer="health check failed")
    await prober._probe(runner)
    assert sched.killed == ["health check failed"]


async def test_missed_probe_spares_a_worker_whose_output_flows() -> None:
    prober, sched, runner = _prober(flows=True, answer="health check failed")
    await prober._probe(runner)
    assert sched.killed == []


async def test_answered_probe_kills_nothing() -> None:
    for flows in (True, False):
        prober, sched, runner = _prober(flows=flows, answer=None)
        await prober._probe(runner)
        assert sched.killed == []
