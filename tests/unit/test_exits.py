"""One reading of how a sandboxed program ended, for every tier."""

from __future__ import annotations

import pytest

from treadle.shuttle.oci.tools import classify_exit
from treadle.shuttle.sandbox.exits import classify


@pytest.mark.parametrize(
    ("reported", "oom", "pids", "expected"),
    [
        ((0, None), False, False, (0, None)),
        ((0, None), True, True, (0, None)),  # a child was refused or killed; the program coped
        ((3, None), False, False, (3, None)),
        ((3, None), False, True, (3, "pids_limit")),
        ((137, None), True, False, (-9, "oom_killed")),
        ((137, None), False, False, (-9, "killed:SIGKILL")),
        ((143, None), False, False, (-15, "killed:SIGTERM")),
        ((-9, None), True, False, (-9, "oom_killed")),
        ((-9, "cancelled"), True, False, (-9, "cancelled")),  # Shuttle knows better
        ((-9, "timeout"), False, False, (-9, "timeout")),
        ((None, None), False, False, (None, "spawn_failed")),
        ((None, "spawn_failed"), False, False, (None, "spawn_failed")),
        ((128 + 100, None), False, False, (228, None)),  # no signal 100: an exit code
    ],
)
def test_every_tier_reads_an_exit_the_same_way(
    reported: tuple[int | None, str | None],
    oom: bool,
    pids: bool,
    expected: tuple[int | None, str | None],
) -> None:
    assert classify(*reported, oom_killed=oom, pids_denied=pids) == expected


@pytest.mark.parametrize(
    ("exit_code", "oom_kills", "reason"),
    [(137, 1, "oom_killed"), (137, 0, "killed:SIGKILL"), (None, 0, "spawn_failed"), (0, 3, None)],
)
def test_a_container_run_outside_shuttle_gets_the_same_reasons(
    exit_code: int | None, oom_kills: int, reason: str | None
) -> None:
    assert classify_exit(exit_code, oom_kills=oom_kills, killed=False) == reason
