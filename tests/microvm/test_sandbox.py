"""A long-lived sandbox on the microvm tier: the node's own `LiveSandbox` (the same code as
every tier's) over QEMU jailed by the namespace tier, the guest agent answering through
QEMU's stdio, its environment from a config disk QEMU reads from a memfd. Seen from the
host, the VMM runs as the workload's unprivileged ids in its own cgroup; stopping the
sandbox leaves no VMM."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import pytest

from microvm.test_boot import qemu_running
from support.runtimes import make_runtime
from treadle.domain.resources import Resources, Tier
from treadle.shuttle.live.box import LiveSandbox, SandboxSpec
from treadle.shuttle.microvm.image import GuestImage
from treadle.shuttle.microvm.launcher import MicrovmLauncher
from treadle.shuttle.runtimes.process import ProcessRuntime

pytestmark = pytest.mark.microvm


HOST_PYTHON = subprocess.run(
    ["/usr/bin/python3", "-c", "import sys; print(sys.version.split()[0])"],
    capture_output=True,
    text=True,
    check=True,
).stdout.strip()


def proc(pid: int | str, name: str) -> str:
    with open(f"/proc/{pid}/{name}") as f:
        return f.read()


async def test_a_sandbox_runs_in_its_own_vm_behind_the_namespace_jail(
    image: GuestImage, tmp_path: Path
) -> None:
    jail = make_runtime((Tier.NAMESPACE, {}), tmp_path / "node")
    assert isinstance(jail, ProcessRuntime)
    launcher = MicrovmLauncher(jail.launcher, image)  # type: ignore[arg-type]
    spec = SandboxSpec(
        id="sbx_1",
        incarnation=1,
        tenant_id="tn_1",
        resources=Resources(cpu_millicores=1000, memory_mib=256),
        isolation=Tier.MICROVM,
        env={"GREETING": "hello from the host", "ODD": "a\nb=c\0"[:-1]},
    )
    workdir = tmp_path / "work" / "sbx_1-1"
    sandbox = await LiveSandbox.start(launcher, spec, workdir)
    try:
        ready = await sandbox.link.ready()
        # The agent is the guest's init, acting as the sandbox's user as in every tier.
        assert (ready.pid, ready.uid) == (1, 1000)
        process = await sandbox.link.exec(
            ["/bin/sh", "-c", 'echo "$GREETING"; printf %s "$ODD" | od -c | head -1; uname -r']
        )
        out = bytearray()
        async for _stream, data in process.output():
            out += data
        assert (await process.wait()).exit_code == 0
        greeting, odd, kernel = out.decode().splitlines()
        assert greeting == "hello from the host"
        assert odd.split()[1:] == ["a", "\\n", "b", "=", "c"]
        assert kernel != platform.release()

        # Its root: the host's programs, read-only; its home and /tmp its own.
        process = await sandbox.link.exec(
            [
                "/bin/sh",
                "-c",
                "python3 -c 'import sys; print(sys.version.split()[0])'; pwd;"
                " echo kept > note && cat note; touch /usr/bin/x 2>/dev/null || echo read-only",
            ]
        )
        out = bytearray()
        async for _stream, data in process.output():
            out += data
        assert (await process.wait()).exit_code == 0
        assert out.decode().splitlines() == [HOST_PYTHON, "/work", "kept", "read-only"]

        vmm = qemu_running(Path("/.treadle/guest"))
        assert len(vmm) == 1
        uid, cgroup, own = proc(vmm[0], "status"), proc(vmm[0], "cgroup"), proc("self", "cgroup")
        ids = next(line.split()[1:] for line in uid.splitlines() if line.startswith("Uid:"))
        if os.geteuid() == 0:
            assert "0" not in ids  # the workload's own host ids, never root
        assert cgroup != own  # the workload's cgroup, not Shuttle's
    finally:
        await sandbox.stop(grace_s=1)
    assert not qemu_running(Path("/.treadle/guest"))


async def test_its_writable_places_are_a_disk_of_its_own_not_its_memory(
    image: GuestImage, tmp_path: Path
) -> None:
    """Home, /tmp and /dev/shm are on the VM's scratch disk (ext4, `disk_mib` of it, on the
    node's disk, gone with the VM): a sandbox writes more than its memory there, and no more
    than its disk, all places together."""
    jail = make_runtime((Tier.NAMESPACE, {}), tmp_path / "node")
    assert isinstance(jail, ProcessRuntime)
    launcher = MicrovmLauncher(jail.launcher, image)  # type: ignore[arg-type]
    spec = SandboxSpec(
        id="sbx_disk",
        incarnation=1,
        tenant_id="tn_1",
        resources=Resources(cpu_millicores=1000, memory_mib=256, disk_mib=400),
        isolation=Tier.MICROVM,
        env={},
    )
    sandbox = await LiveSandbox.start(launcher, spec, tmp_path / "work")
    try:
        process = await sandbox.link.exec(
            [
                "/bin/sh",
                "-c",
                "dd if=/dev/zero of=big bs=1M count=300 2>/dev/null && echo home-ok;"
                " dd if=/dev/zero of=/tmp/more bs=1M count=200 2>&1 | grep -o 'No space left';"
                " mount | grep -c ' ext4 '",
            ]
        )
        out = bytearray()
        async for _stream, data in process.output():
            out += data
        assert (await process.wait()).exit_code == 0
        # 300 MiB in a 256 MiB guest, then /tmp full past the disk's 400 MiB together.
        assert out.decode().split("\n")[:3] == ["home-ok", "No space left", "3"], out
    finally:
        await sandbox.stop(grace_s=1)
