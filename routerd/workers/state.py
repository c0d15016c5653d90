"""Worker lifecycle: an explicit state enum, a transition table and compare-and-swap.

Crash paths are in the table itself (starting → stopped when a load fails, ready → stopped
when the process dies), so no transition ever needs to be forced.
"""

from __future__ import annotations

import enum


class WorkerState(enum.Enum):
    STOPPED = "stopped"
    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"
    FAILED = "failed"  # terminal for this Worker object: load failed or process crashed


TRANSITIONS: dict[WorkerState, frozenset[WorkerState]] = {
    WorkerState.STOPPED: frozenset({WorkerState.STARTING}),
    WorkerState.STARTING: frozenset({WorkerState.READY, WorkerState.STOPPING, WorkerState.FAILED}),
    WorkerState.READY: frozenset({WorkerState.STOPPING, WorkerState.FAILED}),
    WorkerState.STOPPING: frozenset({WorkerState.STOPPED, WorkerState.FAILED}),
    WorkerState.FAILED: frozenset(),
}


class InvalidTransition(RuntimeError):
    pass


def is_valid_transition(current: WorkerState, new: WorkerState) -> bool:
    return new in TRANSITIONS[current]


class StateBox:
    """Holds a WorkerState; `swap(expected, new)` succeeds only from `expected`."""

    def __init__(self, initial: WorkerState = WorkerState.STOPPED) -> None:
        self._state = initial

    @property
    def value(self) -> WorkerState:
        return self._state

    def swap(self, expected: WorkerState | tuple[WorkerState, ...], new: WorkerState) -> bool:
        allowed = expected if isinstance(expected, tuple) else (expected,)
        if self._state not in allowed:
            return False
        if not is_valid_transition(self._state, new):
            raise InvalidTransition(f"{self._state.value} -> {new.value}")
        self._state = new
        return True
