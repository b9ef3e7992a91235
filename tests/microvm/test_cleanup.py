"""The microvm tier leaves nothing behind: after an execution's VM ends or is killed (no
QEMU, cgroup, socket, fd or work dir), and after a Shuttle killed while its VM ran (QEMU
dies with it; the next start sweeps the cgroup)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from contract.test_namespace_cleanup import groups_named, open_files
from support.runtimes import make_runtime, run, shuttle_settings, spec, tag, wait_ended
from treadle.domain.resources import Tier
from treadle.shuttle.microvm.runtime import MicrovmRuntime
from treadle.shuttle.runtimes import NamespaceRuntime
from treadle.shuttle.runtimes.namespace import cgroup_owner
from treadle.shuttle.sandbox import cleanup
from treadle.shuttle.sandbox.cgroups import Cgroups, detect

pytestmark = pytest.mark.microvm


def vmms_of(owner: str) -> list[int]:
    """QEMU processes in a cgroup of the Shuttle whose groups start with `owner`."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                program = f.read().split(b"\0", 1)[0]
            with open(f"/proc/{entry}/cgroup") as f:
                groups = f.read()
        except OSError:
            continue
        if program.endswith(b"qemu-system-x86_64") and f"/{owner}" in groups:
            found.append(int(entry))
    return found


async def test_an_execution_s_vm_leaves_nothing(image: object, tmp_path: Path) -> None:
    home = tmp_path / "home"
    runtime = make_runtime((Tier.MICROVM, {"microvm": True}), home)
    assert isinstance(runtime, MicrovmRuntime)
    layout, _ = detect()
    groups = Cgroups(layout) if layout is not None else None
    owner = cgroup_owner(home)
    before = open_files()

    ended = await run(runtime, spec(["/bin/echo", "13"]), home / "work" / "ex_1-1")
    killed_at_timeout = await run(
        runtime, spec(["/bin/sleep", "600"], id="ex_2", timeout_s=1), home / "work" / "ex_2-1"
    )

    assert ended.output == [("stdout", b"13\n")] and ended.status.exit_code == 0
    assert killed_at_timeout.status.reason == "timeout"
    assert await cleanup.drain()
    assert vmms_of(owner) == []
    assert groups_named(groups, owner) == []
    left = {fd: file for fd, file in open_files().items() if before.get(fd) != file}
    assert left == {}
    assert not [p for p in (home / "work").rglob("*") if p.is_socket()]


SHUTTLE = """
import asyncio, sys
from pathlib import Path
from treadle.domain.resources import Resources, Tier
from treadle.protocol.messages import AssignSpec
from treadle.shuttle.runtimes import available_runtimes
from treadle.shuttle.settings import ShuttleSettings

async def main():
    home = Path(sys.argv[1])
    settings = ShuttleSettings(weaver_url="http://127.0.0.1:9", home=home, microvm=True)
    runtime = available_runtimes(settings)[Tier.MICROVM]
    spec = AssignSpec(
        id="ex", attempt=1, tenant_id="t", function="f", version=1, timeout_s=600,
        argv=["/bin/sh", "-c", "echo up; exec sleep 600", sys.argv[2]],
        resources=Resources(), isolation=Tier.MICROVM,
    )
    handle = await runtime.start(spec, home / "work")
    async for _ in handle.output():
        print("running", flush=True)
        await asyncio.sleep(600)

asyncio.run(main())
"""


@pytest.fixture
def killed_shuttle(image: object, tmp_path: Path) -> Iterator[tuple[Path, list[int]]]:
    """A Shuttle process with its own home, SIGKILLed while its VM ran; yields the home and
    the VMM's pids."""
    home = tmp_path / "home"
    shuttle = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(SHUTTLE), str(home), tag()],
        stdout=subprocess.PIPE,
    )
    try:
        assert shuttle.stdout is not None
        assert shuttle.stdout.readline() == b"running\n"
        vmms = vmms_of(cgroup_owner(home))
        assert vmms != []
        os.kill(shuttle.pid, signal.SIGKILL)
        shuttle.wait()
        yield home, vmms
    finally:
        shuttle.kill()
        shuttle.wait()
        if shuttle.stdout is not None:
            shuttle.stdout.close()


async def test_a_killed_shuttle_s_vm_dies_with_it_and_its_group_is_swept(
    killed_shuttle: tuple[Path, list[int]],
) -> None:
    home, vmms = killed_shuttle
    owner = cgroup_owner(home)
    # QEMU's jail dies with its parent, and QEMU with its jail.
    for pid in vmms:
        assert await wait_ended(pid)
    assert vmms_of(owner) == []
    runtime = NamespaceRuntime(shuttle_settings(home))  # a restart's sweep
    assert groups_named(runtime.cgroups, owner) == []
