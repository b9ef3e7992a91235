"""The namespace tier leaves nothing behind: not after an attempt (cgroups, fds, processes),
and not after a Shuttle that was killed mid-attempt, whose leftovers the next start sweeps."""

from __future__ import annotations

import asyncio
import fcntl
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from support.runtimes import GATED, PY, Gate, pids_with, shuttle_settings, spec, tag, wait_ended
from treadle.domain.resources import Tier
from treadle.shuttle.reaper import reap_orphans
from treadle.shuttle.runtimes import NamespaceRuntime, available_runtimes
from treadle.shuttle.runtimes.namespace import cgroup_owner
from treadle.shuttle.sandbox import cleanup, owners
from treadle.shuttle.sandbox.cgroups import Cgroups, Limits, detect

pytestmark = pytest.mark.skipif(
    Tier.NAMESPACE not in available_runtimes(shuttle_settings(Path("/nonexistent"))),
    reason="the namespace tier is not available here",
)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


@pytest.fixture
def runtime(home: Path) -> NamespaceRuntime:
    return NamespaceRuntime(shuttle_settings(home))


def groups_named(cgroups: Cgroups | None, prefix: str) -> list[Path]:
    if cgroups is None:
        return []
    return [
        group
        for parent in set(cgroups.layout.parents.values())
        for group in parent.iterdir()
        if group.is_dir() and group.name.startswith(prefix)
    ]


def open_files() -> dict[int, tuple[int, int]]:
    """This process's fds, each with the (device, inode) of what it is open on."""
    found = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            info = os.stat(int(name))
        except OSError:
            continue  # the listing's own fd, or one closed meanwhile
        found[int(name)] = (info.st_dev, info.st_ino)
    return found


async def test_an_attempt_leaves_no_group_fd_or_process(
    runtime: NamespaceRuntime, home: Path
) -> None:
    fds_before = open_files()
    gate = Gate()
    code = (
        GATED
        + "import subprocess\nsubprocess.Popen(['sleep', '30'])\nprint('ok', flush=True)\nwait()"
    )
    try:
        handle = await runtime.start(spec([PY, "-c", code, gate.tag]), home / "work" / "ex")
        async with asyncio.timeout(20):
            assert await anext(handle.output()) == ("stdout", b"ok\n")
            if runtime.cgroups is not None:
                assert groups_named(runtime.cgroups, runtime.group_prefix) != []
            processes = pids_with(gate.tag)  # bubblewrap's and the program's
            gate.release()
            assert [item async for item in handle.output()] == []
            status = await handle.wait()
    finally:
        gate.close()

    assert status.exit_code == 0
    # The group goes after the exit report, off its path; a stopping Shuttle drains that.
    assert await cleanup.drain()
    assert cleanup.pending() == 0
    assert groups_named(runtime.cgroups, runtime.group_prefix) == []
    # Nothing this attempt opened is still open: each fd now open is one that was open
    # before (the same file). Earlier tests' background work (a runtime's delete, garbage
    # collected) may close fds meanwhile; that is not this attempt's doing.
    left = {fd: file for fd, file in open_files().items() if fds_before.get(fd) != file}
    assert left == {}
    for pid in processes:
        assert await wait_ended(pid)
    reap_orphans()  # the sandbox's first process ends as a zombie child of ours
    assert still_listed(processes) == []


def still_listed(pids: list[int]) -> list[int]:
    return [pid for pid in pids if os.path.exists(f"/proc/{pid}")]


SHUTTLE = """
import asyncio, sys
from pathlib import Path
from treadle.domain.resources import Resources, Tier
from treadle.protocol.messages import AssignSpec
from treadle.shuttle.runtimes import NamespaceRuntime
from treadle.shuttle.settings import ShuttleSettings

async def main():
    home = Path(sys.argv[1])
    runtime = NamespaceRuntime(ShuttleSettings(weaver_url="http://127.0.0.1:9", home=home))
    spec = AssignSpec(
        id="ex", attempt=1, tenant_id="t", function="f", version=1, timeout_s=60,
        argv=["/usr/bin/python3", "-c", "import time; print('up', flush=True); time.sleep(60)",
              sys.argv[2]],
        resources=Resources(), isolation=Tier.NAMESPACE,
    )
    handle = await runtime.start(spec, home / "work")
    async for _ in handle.output():
        print("running", flush=True)
        await asyncio.sleep(60)

asyncio.run(main())
"""


@pytest.fixture
def killed_shuttle(home: Path) -> Iterator[str]:
    """A Shuttle process with this home, SIGKILLed while its attempt ran; yields the tag of
    the attempt's program."""
    me = tag()
    shuttle = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(SHUTTLE), str(home), me],
        stdout=subprocess.PIPE,
    )
    try:
        assert shuttle.stdout is not None
        assert shuttle.stdout.readline() == b"running\n"
        os.kill(shuttle.pid, signal.SIGKILL)
        shuttle.wait()
        yield me
    finally:
        shuttle.kill()
        shuttle.wait()
        if shuttle.stdout is not None:
            shuttle.stdout.close()


async def test_start_sweeps_what_a_killed_shuttle_left(home: Path, killed_shuttle: str) -> None:
    layout, _ = detect()
    if layout is not None:
        assert groups_named(Cgroups(layout), cgroup_owner(home)) != []  # left behind

    runtime = NamespaceRuntime(shuttle_settings(home))

    assert groups_named(runtime.cgroups, cgroup_owner(home)) == []
    for pid in pids_with(killed_shuttle):
        assert await wait_ended(pid)


async def test_the_sweep_kills_what_runs_in_a_stale_group_and_spares_others(
    home: Path, tmp_path: Path
) -> None:
    probe = NamespaceRuntime(shuttle_settings(home))
    if probe.cgroups is None:
        pytest.skip("limits through rlimits here: no cgroups to sweep")
    layout = probe.cgroups.layout
    # The token of a Shuttle that died: its file is there, nobody holds its lock.
    gone = "0123456789ab"
    (owners.tokens_dir() / gone).touch()
    stale = f"{cgroup_owner(home)}.{gone}.0"
    # A Shuttle that runs keeps its groups, even from a second one started on its home.
    living = "ba9876543210"
    held = os.open(owners.tokens_dir() / living, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC)
    fcntl.flock(held, fcntl.LOCK_EX)
    alive = f"{cgroup_owner(home)}.{living}.0"
    other = f"{cgroup_owner(tmp_path / 'other-home')}.{gone}.0"
    sleepers = []
    try:
        hierarchies = {}
        for name in (stale, alive, other):
            group = probe.cgroups.create(name, Limits())
            hierarchies[name] = len(group.dirs)
            sleeper = await asyncio.create_subprocess_exec("sleep", "60")
            group.place(sleeper.pid)
            sleepers.append(sleeper)

        runtime = NamespaceRuntime(shuttle_settings(home))

        assert await asyncio.wait_for(sleepers[0].wait(), 10) == -signal.SIGKILL
        assert sleepers[1].returncode is None
        assert sleepers[2].returncode is None
        assert groups_named(runtime.cgroups, stale) == []
        assert len(groups_named(runtime.cgroups, alive)) == hierarchies[alive]
        assert len(groups_named(runtime.cgroups, other)) == hierarchies[other]
    finally:
        for sleeper in sleepers:
            if sleeper.returncode is None:
                sleeper.kill()
                await sleeper.wait()
        Cgroups(layout).sweep(lambda name: name in (alive, other))
        os.close(held)
        (owners.tokens_dir() / living).unlink()
