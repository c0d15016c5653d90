"""The worker state machine: every transition, valid or not, and compare-and-swap."""

from __future__ import annotations

import itertools

import pytest

from routerd.workers.state import (TRANSITIONS, InvalidTransition, StateBox, WorkerState,
                                   is_valid_transition)

S = WorkerState
VALID = {
    (S.STOPPED, S.STARTING),
    (S.STARTING, S.READY), (S.STARTING, S.STOPPING), (S.STARTING, S.FAILED),
    (S.READY, S.STOPPING), (S.READY, S.FAILED),
    (S.STOPPING, S.STOPPED), (S.STOPPING, S.FAILED),
}
ALL_PAIRS = list(itertools.product(S, S))


def test_table_covers_every_state() -> None:
    assert set(TRANSITIONS) == set(S)
    assert {(a, b) for a, targets in TRANSITIONS.items() for b in targets} == VALID


@pytest.mark.parametrize(("current", "new"), ALL_PAIRS, ids=lambda s: s.value)
def test_every_transition(current: WorkerState, new: WorkerState) -> None:
    valid = (current, new) in VALID
    assert is_valid_transition(current, new) is valid
    box = StateBox(current)
    if valid:
        assert box.swap(current, new) is True
        assert box.value is new
    else:
        with pytest.raises(InvalidTransition, match=f"{current.value} -> {new.value}"):
            box.swap(current, new)
        assert box.value is current


def test_failed_is_terminal() -> None:
    assert TRANSITIONS[S.FAILED] == frozenset()


def test_crash_paths_need_no_force() -> None:
    # a load that fails and a ready worker that dies are ordinary transitions
    assert is_valid_transition(S.STARTING, S.FAILED)
    assert is_valid_transition(S.READY, S.FAILED)


@pytest.mark.parametrize(("current", "expected"), [
    (c, e) for c, e in ALL_PAIRS if c is not e])
def test_swap_from_unexpected_state_is_a_noop(current: WorkerState,
                                              expected: WorkerState) -> None:
    box = StateBox(current)
    # whatever the target, a swap whose expectation does not hold changes nothing and raises nothing
    for new in S:
        assert box.swap(expected, new) is False
        assert box.value is current


def test_swap_with_several_expected_states() -> None:
    box = StateBox(S.STARTING)
    assert box.swap((S.READY, S.STARTING), S.STOPPING)
    assert box.value is S.STOPPING
    assert not box.swap((S.READY, S.STARTING), S.STOPPING)
    assert box.swap((S.STOPPING,), S.STOPPED)
    assert box.value is S.STOPPED


def test_lifecycle_walk() -> None:
    box = StateBox()
    assert box.value is S.STOPPED
    for a, b in [(S.STOPPED, S.STARTING), (S.STARTING, S.READY), (S.READY, S.STOPPING),
                 (S.STOPPING, S.STOPPED), (S.STOPPED, S.STARTING), (S.STARTING, S.FAILED)]:
        assert box.swap(a, b)
    assert box.value is S.FAILED


def test_concurrent_claims_only_one_wins() -> None:
    box = StateBox(S.READY)
    results = [box.swap(S.READY, S.STOPPING), box.swap(S.READY, S.FAILED)]
    assert results == [True, False]
    assert box.value is S.STOPPING
