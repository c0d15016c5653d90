"""A model's lifecycle in the scheduler: one enum, one transition table, one snapshot.

A model is NOT_LOADED until a request (or a preload) starts a runner: LOADING while its worker
starts, READY while it serves, DRAINING while an unload waits for in-flight requests, STOPPING
while the engine exits; back to NOT_LOADED once it is gone. A load that fails, or a worker
that crashes, leaves the runner FAILED (the model is then restarted by a new runner, or
marked failing by the FailureTracker after repeated failures). Each Runner walks this table
once; the model's state is its current runner's, else LOADING while a load is queued, else
FAILED while the failure tracker refuses it, else NOT_LOADED.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any


class ModelState(enum.Enum):
    NOT_LOADED = "not_loaded"
    LOADING = "loading"
    READY = "ready"
    DRAINING = "draining"
    STOPPING = "stopping"
    FAILED = "failed"


TRANSITIONS: dict[ModelState, frozenset[ModelState]] = {
    ModelState.NOT_LOADED: frozenset({ModelState.LOADING}),
    # a load that is cancelled (shutdown, config reload) stops without failing
    ModelState.LOADING: frozenset({ModelState.READY, ModelState.FAILED, ModelState.STOPPING}),
    ModelState.READY: frozenset({ModelState.DRAINING, ModelState.STOPPING, ModelState.FAILED}),
    ModelState.DRAINING: frozenset({ModelState.STOPPING, ModelState.FAILED}),
    ModelState.STOPPING: frozenset({ModelState.NOT_LOADED, ModelState.FAILED}),
    ModelState.FAILED: frozenset(),
}


@dataclass(frozen=True)
class RunnerSnapshot:
    """What /api/ps, the dashboard and the CLI show of one loaded (or loading) model."""

    name: str
    state: ModelState
    pid: int | None
    backend: str
    ctx_size: int
    parallel: int
    in_use: int
    inflight: int
    estimate: dict[str, int]
    measured: dict[str, int] | None
    booked: dict[str, int]
    expires_at: float | None  # wall clock; None = never
    load_seconds: float
    entry: Any  # the catalog entry (details, digest)

    @property
    def held(self) -> dict[str, int]:
        return self.measured or self.booked
