"""Worker lifecycle: an explicit state enum, a transition table and compare-and-swap.

Crash paths are in the table itself (starting → failed when a load fails, ready → failed when
the process dies, stopping → failed when it has to be killed), so no transition ever needs to
be forced. `StateBox` is generic: the model lifecycle (scheduler/lifecycle.py) uses it too.
"""

from __future__ import annotations

import enum
from typing import Generic, Mapping, TypeVar


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


S = TypeVar("S", bound=enum.Enum)


class StateBox(Generic[S]):
    """Holds a state; `swap(expected, new)` succeeds only from `expected`, and only along
    the transition table (a move the table lacks raises InvalidTransition)."""

    def __init__(self, initial: S | None = None,
                 transitions: Mapping[S, frozenset[S]] | None = None) -> None:
        self._state: S = initial if initial is not None else WorkerState.STOPPED  # type: ignore[assignment]
        self._table: Mapping[S, frozenset[S]] = (
            transitions if transitions is not None else TRANSITIONS)  # type: ignore[assignment]

    @property
    def value(self) -> S:
        return self._state

    def swap(self, expected: S | tuple[S, ...], new: S) -> bool:
        allowed = expected if isinstance(expected, tuple) else (expected,)
        if self._state not in allowed:
            return False
        if new not in self._table[self._state]:
            raise InvalidTransition(f"{self._state.value} -> {new.value}")
        self._state = new
        return True
