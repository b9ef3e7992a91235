"""The sandbox state machine: which transitions exist, what the reconciler does next, and
what an incarnation's end means under each restart policy."""

from __future__ import annotations

import itertools

import pytest

from treadle.domain.errors import InvalidTransition
from treadle.domain.resources import Tier
from treadle.domain.sandbox import (
    LIVE_STATUSES,
    ON_NODE_STATUSES,
    TERMINAL_STATUSES,
    Desired,
    End,
    RestartPolicy,
    SandboxEvent,
    SandboxStatus,
    Step,
    after_end,
    apply,
    desire,
    next_step,
)

S, E = SandboxStatus, SandboxEvent

ALLOWED = {
    (S.PENDING, E.PLACE): S.STARTING,
    (S.PENDING, E.STOP): S.STOPPED,
    (S.STARTING, E.STARTED): S.RUNNING,
    (S.RUNNING, E.STARTED): S.RUNNING,
    (S.RUNNING, E.PAUSED): S.PAUSED,
    (S.RUNNING, E.RESUMED): S.RUNNING,
    (S.PAUSED, E.PAUSED): S.PAUSED,
    (S.PAUSED, E.RESUMED): S.RUNNING,
    **{(s, E.STOP): S.STOPPING for s in (S.STARTING, S.RUNNING, S.PAUSED, S.STOPPING)},
    **{(s, E.STOPPED): S.STOPPED for s in (S.STARTING, S.RUNNING, S.PAUSED, S.STOPPING)},
    **{(s, E.RESTART): S.PENDING for s in (S.STARTING, S.RUNNING, S.PAUSED, S.STOPPING)},
    **{(s, E.END): S.STOPPED for s in (S.STARTING, S.RUNNING, S.PAUSED, S.STOPPING)},
    **{(s, E.FAIL): S.FAILED for s in (S.STARTING, S.RUNNING, S.PAUSED, S.STOPPING)},
}


@pytest.mark.parametrize(("status", "event"), list(itertools.product(S, E)))
def test_every_transition_is_either_allowed_or_refused(status: S, event: E) -> None:
    if (status, event) in ALLOWED:
        assert apply(status, event) == ALLOWED[(status, event)]
    else:
        with pytest.raises(InvalidTransition):
            apply(status, event)


def test_terminal_statuses_have_no_way_out() -> None:
    assert {S.STOPPED, S.FAILED} == TERMINAL_STATUSES
    assert set(S) == LIVE_STATUSES | TERMINAL_STATUSES
    assert not [key for key in ALLOWED if key[0] in TERMINAL_STATUSES]


def test_a_sandbox_that_was_never_started_needs_no_node_to_stop() -> None:
    assert S.PENDING not in ON_NODE_STATUSES
    assert next_step(Desired.STOPPED, S.PENDING) == Step.FINISH
    assert apply(S.PENDING, E.STOP) == S.STOPPED


@pytest.mark.parametrize(
    ("desired", "status", "step"),
    [
        (Desired.RUNNING, S.PENDING, Step.PLACE),
        (Desired.PAUSED, S.PENDING, Step.PLACE),  # it must exist before it can be paused
        (Desired.RUNNING, S.STARTING, None),
        (Desired.PAUSED, S.STARTING, None),
        (Desired.RUNNING, S.RUNNING, None),
        (Desired.PAUSED, S.RUNNING, Step.PAUSE),
        (Desired.RUNNING, S.PAUSED, Step.RESUME),
        (Desired.PAUSED, S.PAUSED, None),
        (Desired.STOPPED, S.PENDING, Step.FINISH),
        (Desired.STOPPED, S.STARTING, Step.STOP),
        (Desired.STOPPED, S.RUNNING, Step.STOP),
        (Desired.STOPPED, S.PAUSED, Step.STOP),
        (Desired.STOPPED, S.STOPPING, None),
        (Desired.RUNNING, S.STOPPING, None),
        *[(d, s, None) for d in Desired for s in TERMINAL_STATUSES],
    ],
)
def test_the_reconciler_steps_toward_what_is_desired(
    desired: Desired, status: S, step: Step | None
) -> None:
    assert next_step(desired, status) == step


def test_a_stopped_sandbox_stays_stopped() -> None:
    assert desire(Desired.RUNNING, Desired.PAUSED, S.RUNNING) == Desired.PAUSED
    assert desire(Desired.PAUSED, Desired.RUNNING, S.PAUSED) == Desired.RUNNING
    assert desire(Desired.STOPPED, Desired.STOPPED, S.STOPPING) == Desired.STOPPED
    for status in TERMINAL_STATUSES:
        assert desire(Desired.RUNNING, Desired.STOPPED, status) == Desired.STOPPED
        with pytest.raises(InvalidTransition):
            desire(Desired.RUNNING, Desired.RUNNING, status)
    with pytest.raises(InvalidTransition):
        desire(Desired.STOPPED, Desired.RUNNING, S.STOPPING)


@pytest.mark.parametrize(
    ("policy", "end", "event"),
    [
        (RestartPolicy.ALWAYS, End.EXITED, E.RESTART),
        (RestartPolicy.ALWAYS, End.CRASHED, E.RESTART),
        (RestartPolicy.ALWAYS, End.NODE_LOST, E.RESTART),
        (RestartPolicy.ON_FAILURE, End.EXITED, E.END),
        (RestartPolicy.ON_FAILURE, End.CRASHED, E.RESTART),
        (RestartPolicy.ON_FAILURE, End.NODE_LOST, E.RESTART),
        (RestartPolicy.NEVER, End.EXITED, E.END),
        (RestartPolicy.NEVER, End.CRASHED, E.FAIL),
        (RestartPolicy.NEVER, End.NODE_LOST, E.FAIL),
    ],
)
def test_an_unasked_end_restarts_by_policy(policy: RestartPolicy, end: End, event: E) -> None:
    decision = after_end(policy, end, Desired.RUNNING)
    assert (decision.event, decision.reason) == (event, end.value)
    # Paused sandboxes come back the same way (and are paused again by the reconciler).
    assert after_end(policy, end, Desired.PAUSED).event == event


@pytest.mark.parametrize("end", list(End))
def test_a_sandbox_meant_to_stop_is_never_restarted(end: End) -> None:
    assert after_end(RestartPolicy.ALWAYS, end, Desired.STOPPED).event == E.END


def test_only_tiers_with_a_boundary_pause() -> None:
    assert desire(Desired.RUNNING, Desired.PAUSED, S.RUNNING, Tier.NAMESPACE) == Desired.PAUSED
    assert desire(Desired.RUNNING, Desired.PAUSED, S.PENDING, None) == Desired.PAUSED
    with pytest.raises(InvalidTransition, match="cannot be paused"):
        desire(Desired.RUNNING, Desired.PAUSED, S.RUNNING, Tier.PROCESS)
    assert desire(Desired.RUNNING, Desired.STOPPED, S.RUNNING, Tier.PROCESS) == Desired.STOPPED
