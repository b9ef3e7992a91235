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


# Waits for a line, then writes 2 MiB to a file and reads it back, both past the page cache
# (O_DIRECT), so that the disk is used whatever the cache holds.
_DIRECT_IO = """
import mmap, os, sys
sys.stdin.readline()
buffer = mmap.mmap(-1, 1 << 20)
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o600)
written = sum(os.pwritev(fd, [buffer], i << 20) for i in range(2))
read = sum(os.preadv(fd, [buffer], i << 20) for i in range(2))
print(written, read)
"""


def test_a_group_counts_its_disk_reads_and_writes(tmp_path: os.PathLike[str]) -> None:
    assert LAYOUT is not None
    if not LAYOUT.has("io") and not LAYOUT.has("blkio"):
        pytest.skip("no io or blkio controller here")
    from treadle.domain.resources import Resources

    limits = Limits.for_resources(Resources(), pids_max=16)
    made = Cgroups(LAYOUT).create(f"test-{uuid.uuid4().hex[:12]}", limits)
    try:
        before = made.usage()
        assert (before.disk_read_bytes, before.disk_write_bytes) == (0, 0)
        target = os.path.join(tmp_path, "written")
        child = subprocess.Popen(
            ["python3", "-c", _DIRECT_IO, target],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        made.place(child.pid)
        out, _ = child.communicate("go\n", timeout=60)
        assert child.returncode == 0 and out.split() == [str(2 << 20), str(2 << 20)]
        after = made.usage()
        assert after.disk_read_bytes is not None and after.disk_read_bytes >= 2 << 20
        assert after.disk_write_bytes is not None and after.disk_write_bytes >= 2 << 20
    finally:
        made.destroy()
