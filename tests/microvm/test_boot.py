"""A guest booted with QEMU's microvm machine: its agent (the same program as every tier's)
answers over the virtio-serial port, runs a command in the guest's own kernel, and what it
sends is held to the guest protocol: a hostile agent breaks its link and harms nothing."""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
from pathlib import Path

import pytest

from microvm.conftest import PACKAGE
from treadle.shuttle.live.link import GuestLink, LinkBroken
from treadle.shuttle.microvm import qemu
from treadle.shuttle.microvm.image import GuestImage, build

pytestmark = pytest.mark.microvm

# Generous: software emulation on a busy 2-core machine boots in 2-3 s.
BOOT_S = 120.0


def qemu_running(workdir: Path) -> list[int]:
    """QEMU processes (not what jails them) whose command line names `workdir`."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            program = cmdline.split(b"\0", 1)[0]
            if program.endswith(b"qemu-system-x86_64") and str(workdir).encode() in cmdline:
                found.append(int(entry))
    return found


async def run(link: GuestLink, argv: list[str]) -> tuple[bytes, int | None]:
    process = await link.exec(argv)
    out = b""
    async for _stream, data in process.output():
        out += data
    return out, (await process.wait()).exit_code


async def test_the_guest_agent_runs_a_command_in_the_guest_s_own_kernel(
    image: GuestImage, tmp_path: Path
) -> None:
    workdir = tmp_path / "vm"
    vm = await qemu.boot(image, workdir, memory_mib=192, timeout_s=BOOT_S)
    broken: list[str] = []
    fd = vm.channel.fileno()
    link = GuestLink(os.dup(fd), os.dup(fd), on_broken=broken.append)
    try:
        ready = await asyncio.wait_for(link.ready(), BOOT_S)
        assert (ready.pid, ready.uid) == (1, 0)  # the agent is the guest's PID 1
        out, code = await run(
            link, ["/bin/sh", "-c", "echo 13; uname -r; grep MemTotal /proc/meminfo"]
        )
        assert code == 0
        echoed, kernel, memory = out.decode().splitlines()
        assert echoed == "13"
        assert kernel != platform.release() and kernel in PACKAGE.name  # type: ignore[union-attr]
        assert 100_000 < int(memory.split()[1]) <= 192 * 1024  # its own memory, in kB
        assert qemu_running(workdir)
    finally:
        link.close()
        await vm.close()
    assert not broken
    assert not qemu_running(workdir) and not workdir.exists()


# Says it is ready, then sends a header longer than the protocol allows, then floods.
HOSTILE = b"""
import json, os, struct
def frame(header, payload=b""):
    head = json.dumps(header).encode()
    os.write(1, struct.pack(">II", len(head), len(payload)) + head + payload)
frame({"ev": "ready", "pid": 1, "uid": 0})
os.write(1, struct.pack(">II", 1 << 30, 0))
while True:
    os.write(1, b"x" * 65536)
"""


async def test_a_hostile_guest_agent_breaks_its_link_and_nothing_else(
    package: Path, tmp_path: Path
) -> None:
    hostile = build(package, agent=HOSTILE)
    workdir = tmp_path / "vm"
    vm = await qemu.boot(hostile, workdir, memory_mib=128, timeout_s=BOOT_S)
    broken: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    fd = vm.channel.fileno()
    link = GuestLink(
        os.dup(fd), os.dup(fd), on_broken=lambda why: broken.done() or broken.set_result(why)
    )
    try:
        # Its `ready` and the frame after it may come in one read: the link breaks on the
        # second whether or not the first was taken.
        with contextlib.suppress(LinkBroken):
            await asyncio.wait_for(link.ready(), BOOT_S)
        why = await asyncio.wait_for(broken, BOOT_S)
        assert "too large" in why
        assert link.closed
        with pytest.raises(LinkBroken):
            await link.exec(["true"])
    finally:
        link.close()
        await vm.close()
    assert not qemu_running(workdir) and not workdir.exists()


async def test_a_guest_that_cannot_boot_ends_with_what_qemu_said(
    image: GuestImage, tmp_path: Path
) -> None:
    not_a_kernel = tmp_path / "vmlinux"
    not_a_kernel.write_bytes(b"\x7fELF but not a kernel")
    broken = GuestImage(not_a_kernel, image.initrd, "broken")
    workdir = tmp_path / "vm"
    vm = await qemu.boot(broken, workdir, timeout_s=BOOT_S)
    fd = vm.channel.fileno()
    link = GuestLink(os.dup(fd), os.dup(fd), on_broken=lambda why: None)
    try:
        with pytest.raises(LinkBroken):
            await asyncio.wait_for(link.ready(), BOOT_S)
        assert await vm.wait() != 0
        assert "kernel" in bytes(vm.console).decode().lower()
    finally:
        link.close()
        await vm.close()
    assert not qemu_running(workdir) and not workdir.exists()
