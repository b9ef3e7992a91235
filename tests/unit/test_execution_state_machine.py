"""The execution state machine: exactly one terminal state, never left (DESIGN §2)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from treadle.domain.errors import InvalidTransition
from treadle.domain.execution import (
    TERMINAL_STATES,
    Event,
    ExecutionState,
    apply,
    exit_outcome,
    is_terminal,
)

S, E = ExecutionState, Event


def run(events: list[Event]) -> tuple[list[ExecutionState], int]:
    """Apply events from `open`, skipping invalid ones; the states visited and rejections."""
    state, visited, rejected = S.OPEN, [S.OPEN], 0
    for event in events:
        try:
            state = apply(state, event)
        except InvalidTransition:
            rejected += 1
            continue
        visited.append(state)
    return visited, rejected


@given(st.lists(st.sampled_from(list(Event)), max_size=60))
def test_no_sequence_reaches_two_terminal_states_or_leaves_one(events: list[Event]) -> None:
    visited, _ = run(events)
    terminal_positions = [i for i, state in enumerate(visited) if is_terminal(state)]
    assert len(terminal_positions) <= 1
    if terminal_positions:
        # once terminal, it is the last state ever visited
        assert terminal_positions[0] == len(visited) - 1


@given(st.sampled_from(sorted(TERMINAL_STATES)), st.sampled_from(list(Event)))
def test_terminal_states_reject_every_event(state: ExecutionState, event: Event) -> None:
    with pytest.raises(InvalidTransition) as info:
        apply(state, event)
    assert info.value.details == {"state": state.value, "event": event.value}


@pytest.mark.parametrize(
    ("events", "final"),
    [
        ([E.START, E.SUCCEED], S.SUCCESS),
        ([E.START, E.FAIL], S.FAILURE),
        ([E.START, E.TIME_OUT], S.TIMEOUT),
        ([E.START, E.CANCEL], S.CANCELLED),
        ([E.CANCEL], S.CANCELLED),
        ([E.GIVE_UP], S.FAILURE),
        ([E.START, E.REQUEUE, E.START, E.SUCCEED], S.SUCCESS),
        ([E.REQUEUE, E.START, E.SUCCEED], S.SUCCESS),
        ([E.START, E.GIVE_UP], S.FAILURE),
    ],
)
def test_lifecycle_paths(events: list[Event], final: ExecutionState) -> None:
    visited, rejected = run(events)
    assert rejected == 0
    assert visited[-1] is final


@pytest.mark.parametrize(
    ("state", "event"),
    [(S.OPEN, E.SUCCEED), (S.OPEN, E.FAIL), (S.OPEN, E.TIME_OUT), (S.RUNNING, E.START)],
)
def test_events_out_of_phase_are_rejected(state: ExecutionState, event: Event) -> None:
    with pytest.raises(InvalidTransition):
        apply(state, event)


@pytest.mark.parametrize(
    ("exit_code", "reason", "event", "error"),
    [
        (0, None, E.SUCCEED, None),
        (3, None, E.FAIL, "exit_code"),
        (-9, "timeout", E.TIME_OUT, "timeout"),
        (-9, "cancelled", E.CANCEL, "cancelled"),
        (None, "spawn_failed", E.FAIL, "spawn_failed"),
        (-11, "killed:SIGSEGV", E.FAIL, "killed:SIGSEGV"),
        (0, "killed:SIGKILL", E.FAIL, "killed:SIGKILL"),
    ],
)
def test_exit_reports_map_to_outcomes(
    exit_code: int | None, reason: str | None, event: Event, error: str | None
) -> None:
    outcome = exit_outcome(exit_code, reason)
    assert (outcome.event, outcome.reason) == (event, error)
