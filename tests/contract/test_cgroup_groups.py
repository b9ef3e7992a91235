"""The sandbox layer's cgroups on this host's real hierarchies: a group freezes and thaws what
runs in it, and `destroy` leaves nothing, also of groups below it that a tool made."""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator

import pytest

from treadle.shuttle.sandbox.cgroups import Cgroups, Group, Limits, detect

LAYOUT, FOUND = detect()
pytestmark = pytest.mark.skipif(LAYOUT is None, reason=f"no usable cgroups here: {FOUND}")


@pytest.fixture
def group() -> Iterator[Group]:
    assert LAYOUT is not None
    made = Cgroups(LAYOUT).create(
        f"test-{uuid.uuid4().hex[:12]}", Limits(pids_max=16), freezable=True
    )
    yield made
    made.destroy()


def wait_until(condition: Callable[[], bool], what: str) -> None:
    """Poll a state the kernel reports (there is no event to wait on), bounded."""
    deadline = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.005)


def state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rsplit(")", 1)[1].split()[0]


def test_a_frozen_group_runs_nothing_until_thawed(group: Group) -> None:
    if LAYOUT is not None and LAYOUT.version == 1 and not LAYOUT.has("freezer"):
        pytest.skip("no v1 freezer hierarchy here")
    busy = subprocess.Popen(["/bin/sh", "-c", "while :; do :; done"])
    try:
        group.place(busy.pid)
        wait_until(lambda: state(busy.pid) == "R", "the loop runs")

        group.freeze()
        wait_until(group.frozen, "the kernel reports the group frozen")
        # A frozen task sleeps in the freezer, whatever it was doing.
        assert state(busy.pid) in ("D", "S")
        assert group.pids() == {busy.pid}

        group.thaw()
        wait_until(lambda: not group.frozen(), "the kernel reports the group thawed")
        wait_until(lambda: state(busy.pid) == "R", "the loop runs again")
    finally:
        busy.kill()
        busy.wait()


def test_destroy_kills_what_runs_and_removes_groups_below(group: Group) -> None:
    sleeper = subprocess.Popen(["sleep", "60"])
    group.place(sleeper.pid)
    below = [directory / "made-by-a-tool" for directory in group.dirs]
    for directory in below:
        directory.mkdir()

    assert group.destroy() == []

    assert sleeper.wait(timeout=10) == -9
    assert [d for d in (*below, *group.dirs) if os.path.exists(d)] == []
