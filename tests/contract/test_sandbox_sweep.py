"""A Shuttle SIGKILLed while it holds sandboxes leaves them behind: their cgroups, processes
(a frozen sandbox's ones, which no signal ends while they are frozen), and in the OCI tiers
the runtime's containers, bundles and work dirs (tmpfs mounts). The next Shuttle started on
the same home sweeps all of it before it takes work (DESIGN §4, and
`treadle.shuttle.sandbox.cleanup` for what a stopping Shuttle leaves to that sweep).

Real Weaver and Shuttle processes, in every isolating tier this host offers: the test kills
the Shuttle as a host would, starts it again, and looks at this host. Each sandbox runs two
processes exec'd into it with a marker argument (a sleep of a duration no other process has):
one in the background of a finished exec, one an exec stream left running. One sandbox is
paused when the Shuttle dies (its cgroup frozen, or its OCI runtime's pause)."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from support.cluster import Cluster, eventually
from support.runtimes import pids_with, runtime_params
from support.sandboxes import (
    HostProcess,
    create,
    host_process,
    mounts_under,
    reaches,
    run,
    socket_to,
    start,
)
from treadle.domain.resources import Tier
from treadle.shuttle.mounts import unmount
from treadle.shuttle.oci.bundle import CGROUP_PARENT
from treadle.shuttle.runtimes.namespace import cgroup_owner
from treadle.shuttle.sandbox.cgroups import PARENT, cgroup_roots
from treadle.shuttle.sandbox.state import state_root

pytestmark = pytest.mark.integration

NAME = "swept"
TIERS = runtime_params(process=False)
assert PARENT == CGROUP_PARENT  # both tiers' groups are found under one parent below


def sleep_marker() -> str:
    """A duration for `sleep` that no other process on this host has in its arguments."""
    return f"{random.randint(100_000, 999_999)}.{random.randint(100_000, 999_999)}"


def groups_of(home: Path, *, but: str | None = None) -> list[Path]:
    """Every cgroup directory, in every mounted hierarchy, of the Shuttles with this home,
    deepest first: the namespace tier's `treadle/<owner>.<token>.<random>` and the OCI
    tiers' `treadle/<owner>.<pid>/…` (except the group named `but`)."""
    owner = cgroup_owner(home) + "."
    found: list[Path] = []
    for root in cgroup_roots(Path("/proc/self/mountinfo").read_text()):
        parent = root / PARENT
        with contextlib.suppress(OSError):
            for group in parent.iterdir():
                if group.is_dir() and group.name.startswith(owner) and group.name != but:
                    found += [p for p in group.rglob("*") if p.is_dir()] + [group]
    return sorted(found, key=lambda p: len(p.parts), reverse=True)


def frozen(group: Path) -> bool:
    """Whether `group` is frozen (v1: its freezer.state; v2: cgroup.freeze)."""
    for name, value in (("freezer.state", "FROZEN"), ("cgroup.freeze", "1")):
        with contextlib.suppress(OSError):
            if (group / name).read_text().strip() == value:
                return True
    return False


def tasks(groups: list[Path]) -> set[HostProcess]:
    found = set()
    for group in groups:
        with contextlib.suppress(OSError):
            for pid in (group / "cgroup.procs").read_text().split():
                process = host_process(int(pid))
                if process is not None:
                    found.add(process)
    return found


def oci_state(home: Path, shuttle_pid: int) -> Path:
    """Where an OCI tier of the Shuttle with this home and pid keeps its containers' state,
    bundles and work dirs (`treadle.shuttle.runtimes.oci`)."""
    return state_root() / "oci" / "shuttles" / f"{cgroup_owner(home)}.{shuttle_pid}"


def release(home: Path, *states: Path) -> None:
    """Whatever the test leaves of this home's sandboxes on this host, gone: thawed, killed,
    removed, unmounted (the leftovers of a sweep that failed must not outlive the test)."""

    def gone() -> bool:
        for group in groups_of(home):
            with contextlib.suppress(OSError):
                if (group / "freezer.state").exists():
                    (group / "freezer.state").write_text("THAWED")
                elif (group / "cgroup.freeze").exists():
                    (group / "cgroup.freeze").write_text("0")
            for process in tasks([group]):
                with contextlib.suppress(OSError):
                    os.kill(process.pid, signal.SIGKILL)
            with contextlib.suppress(OSError):
                group.rmdir()
        return not groups_of(home)

    with contextlib.suppress(AssertionError):
        eventually(gone, timeout=10, what="the test's leftovers to be removed")
    for state in states:
        for point in sorted(mounts_under(state), key=len, reverse=True):
            with contextlib.suppress(OSError):
                unmount(Path(point))
        shutil.rmtree(state, ignore_errors=True)


@pytest.fixture(params=TIERS)
def tier(request: pytest.FixtureRequest) -> tuple[Tier, dict[str, Any]]:
    param: tuple[Tier, dict[str, Any]] = request.param
    return param


@pytest.fixture
def oci_states() -> list[Path]:
    """The OCI state directories of the test's Shuttles, to release after it."""
    return []


@pytest.fixture
def cluster(tmp_path: Path, oci_states: list[Path]) -> Iterator[Cluster]:
    cluster = Cluster(tmp_path)
    try:
        # A long grace: the node that comes back is the same node, not a lost one.
        cluster.start_weaver(process_tier=False, node_down_after_s="60")
        yield cluster
    finally:
        cluster.stop()
        release(tmp_path / NAME, *oci_states)


def occupy(cluster: Cluster, sandbox_id: str, *, host_pids: bool) -> list[str]:
    """Start two processes in the sandbox that run until killed; their markers."""
    background, streamed = sleep_marker(), sleep_marker()
    with cluster.client() as api:
        run(api, sandbox_id, f"sleep {background} >/dev/null 2>&1 &")
    with socket_to(cluster, f"/v1/sandboxes/{sandbox_id}/exec") as ws:
        start(ws, cmd=["sleep", streamed], tag="left-running")
    if host_pids:
        eventually(
            lambda: all(pids_with(m) for m in (background, streamed)), what="the sleeps to run"
        )
    return [background, streamed]


def test_a_restarted_shuttle_sweeps_what_its_killed_predecessor_left_of_its_sandboxes(
    cluster: Cluster,
    tier: tuple[Tier, dict[str, Any]],
    tmp_path: Path,
    oci_states: list[Path],
) -> None:
    level, overrides = tier
    args = ["--runtime", str(level)]
    if "oci_tool" in overrides:
        args += ["--oci-tool", overrides["oci_tool"]]
    home = tmp_path / NAME
    # gVisor runs a sandbox's processes in its own kernel: the host sees its sentry, not them.
    host_pids = level is not Tier.GVISOR
    shuttle = cluster.start_shuttle(NAME, *args)
    old_state: Path | None = None
    if level in (Tier.OCI, Tier.GVISOR):
        old_state = oci_state(home, shuttle.pid)
        oci_states.append(old_state)
    with cluster.client() as api:
        # `never`: nothing is started again on the node once it comes back, so whatever of
        # these sandboxes is found on this host afterwards was left behind.
        running = create(api, isolation=str(level), restart="never")
        paused = create(api, isolation=str(level), restart="never")
        marks: list[str] = []
        for sandbox in (running, paused):
            reaches(api, sandbox["id"], "running")
            marks += occupy(cluster, sandbox["id"], host_pids=host_pids)
        assert api.post(f"/v1/sandboxes/{paused['id']}/pause").status_code == 200
        reaches(api, paused["id"], "paused")

        groups = groups_of(home)
        assert groups, "no cgroup to look at"
        processes = tasks(groups)
        for mark in marks:
            processes |= {p for pid in pids_with(mark) if (p := host_process(pid)) is not None}
        if host_pids:
            assert [g for g in groups if frozen(g)], "the paused sandbox's group is not frozen"
        if old_state is not None:
            assert mounts_under(old_state), "no work dir mounted: nothing to sweep there"

        shuttle.stop(signal.SIGKILL)
        # Left behind at least: the paused sandbox, which cannot end on its own. (The other
        # one's agent sees its link to the dead Shuttle close, and may exit meanwhile.)
        assert any(g.is_dir() for g in groups)

        again = cluster.start_shuttle(NAME, *args)  # the same home
        mine = f"{cgroup_owner(home)}.{again.pid}"  # the new Shuttle's OCI groups' parent

        def left() -> dict[str, Any] | None:
            found: dict[str, Any] = {
                "processes": sorted(p.pid for p in processes if p.alive()),
                "marked processes": {m: pids_with(m) for m in marks if pids_with(m)},
                "groups": [str(g) for g in groups_of(home, but=mine)],
                "frozen groups": [str(g) for g in groups_of(home, but=mine) if frozen(g)],
                "mounts": mounts_under(tmp_path),
                "work dir": sorted(p.name for p in (home / "work").iterdir()),
            }
            if old_state is not None:
                found["old OCI state"] = str(old_state) if old_state.exists() else None
                found["old OCI mounts"] = mounts_under(old_state)
            return {k: v for k, v in found.items() if v} or None

        try:
            eventually(lambda: left() is None, timeout=10, what="the leftovers to be swept")
        except AssertionError:
            raise AssertionError(f"left behind after the restart: {left()}") from None

        # Weaver agrees: the node came back without them, and they are not started again.
        for sandbox in (running, paused):
            ended = reaches(api, sandbox["id"], "failed")
            assert "no longer holds it" in ended["end_reason"], ended
            assert ended["incarnation"] == 1
