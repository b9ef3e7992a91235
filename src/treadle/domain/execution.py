"""The execution state machine (DESIGN §2): the only place that decides which transitions exist.

    open ──start──▶ running ──succeed/fail/time_out──▶ success | failure | timeout
      │                │ └──cancel──▶ cancelled
      │                └──requeue (attempts left)──▶ open (attempt + 1)
      ├──cancel──▶ cancelled
      └──give_up──▶ failure (reason: unschedulable / node_lost)

Terminal states have no outgoing transitions, so an execution reaches exactly one of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from treadle.domain.errors import InvalidTransition

__all__ = [
    "ACTIVE_STATES",
    "TERMINAL_STATES",
    "Event",
    "ExecutionState",
    "Outcome",
    "apply",
    "exit_outcome",
    "is_terminal",
]


class ExecutionState(StrEnum):
    OPEN = "open"
    RUNNING = "running"
    SUCCESS = "success"
    FAILURE = "failure"
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"


class Event(StrEnum):
    START = "start"
    SUCCEED = "succeed"
    FAIL = "fail"
    TIME_OUT = "time_out"
    CANCEL = "cancel"
    REQUEUE = "requeue"
    GIVE_UP = "give_up"


TERMINAL_STATES = frozenset(
    {
        ExecutionState.SUCCESS,
        ExecutionState.FAILURE,
        ExecutionState.TIMEOUT,
        ExecutionState.CANCELLED,
    }
)

# Not ended: open (waiting or assigned) or running. What a node can be holding.
ACTIVE_STATES = frozenset({ExecutionState.OPEN, ExecutionState.RUNNING})

_S = ExecutionState
_TABLE: dict[tuple[ExecutionState, Event], ExecutionState] = {
    (_S.OPEN, Event.START): _S.RUNNING,
    (_S.OPEN, Event.CANCEL): _S.CANCELLED,
    (_S.OPEN, Event.GIVE_UP): _S.FAILURE,
    # Placed on a node that was lost before it reported a start: the report may have been
    # lost with the link, so the next try is a new attempt, fenced off from the old one.
    (_S.OPEN, Event.REQUEUE): _S.OPEN,
    (_S.RUNNING, Event.SUCCEED): _S.SUCCESS,
    (_S.RUNNING, Event.FAIL): _S.FAILURE,
    (_S.RUNNING, Event.TIME_OUT): _S.TIMEOUT,
    (_S.RUNNING, Event.CANCEL): _S.CANCELLED,
    (_S.RUNNING, Event.REQUEUE): _S.OPEN,
    (_S.RUNNING, Event.GIVE_UP): _S.FAILURE,
}


def is_terminal(state: ExecutionState) -> bool:
    return state in TERMINAL_STATES


def apply(state: ExecutionState, event: Event) -> ExecutionState:
    """The state after `event`, or InvalidTransition when `event` is not valid in `state`."""
    try:
        return _TABLE[(state, event)]
    except KeyError:
        raise InvalidTransition(
            f"cannot {event.value} an execution that is {state.value}",
            details={"state": state.value, "event": event.value},
        ) from None


@dataclass(frozen=True, slots=True)
class Outcome:
    event: Event
    reason: str | None


def exit_outcome(exit_code: int | None, reason: str | None) -> Outcome:
    """Map a node's exit report to the event that ends the attempt.

    `reason` is what the node observed: None for a normal exit, "timeout", "cancelled",
    "spawn_failed", or a signal name when the process was killed by one.
    """
    if reason == "timeout":
        return Outcome(Event.TIME_OUT, "timeout")
    if reason == "cancelled":
        return Outcome(Event.CANCEL, "cancelled")
    if reason is None and exit_code == 0:
        return Outcome(Event.SUCCEED, None)
    if reason is None:
        return Outcome(Event.FAIL, "exit_code")
    return Outcome(Event.FAIL, reason)
