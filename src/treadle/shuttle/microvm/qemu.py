"""Booting the guest with QEMU's `microvm` machine: the command line, the accelerator, and the
guest agent's channel.

The channel is a virtio-serial port named `image.PORT_NAME`, whose host end is a Unix socket
that Shuttle listens on before QEMU starts and QEMU connects to (its chardev in client mode):
no waiting for a socket file to appear, and QEMU is the one that connects, once. Everything
that comes over it is the guest's, held to `treadle.protocol.guest` like the other tiers'.

The accelerator: KVM where a real boot under it reaches the guest agent within a timeout
(`probe`), software emulation (TCG) otherwise. `/dev/kvm` existing is not enough: nested KVM
on some hosts opens and then fails on the first MSR the guest sets.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import shutil
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from treadle.protocol.guest import FrameReader, GuestProtocolError, Ready
from treadle.shuttle.microvm.image import (
    BIND_TAG,
    BINDS_ARG,
    CONFIG_ARG,
    CONFIG_SERIAL,
    HOME_ARG,
    PORT_NAME,
    ROOT_ARG,
    ROOT_TAG,
    SCRATCH_ARG,
    SCRATCH_SERIAL,
    GuestImage,
)

__all__ = ["Accel", "BootFailed", "Vm", "argv", "boot", "probe", "tsc_khz"]

Accel = Literal["kvm", "tcg"]
# What the guest is told: a quiet console on the one serial port, no reboot (a guest that
# ends ends QEMU), and what keeps a microvm booting fast, or at all, under TCG (with the
# TSC's rate, `tsc_khz`, where the host says it).
_CMDLINE = (
    "console=ttyS0 quiet panic=-1 reboot=t mitigations=off no_timer_check "
    "cryptomgr.notests i8042.noaux 8250.nr_uarts=1 nokaslr random.trust_cpu=on"
)


@functools.cache
def _host_tsc_khz() -> int | None:
    """`tsc_khz` of this host, read once: every boot asks for it."""
    return tsc_khz()


def tsc_khz(cpuinfo: str | None = None) -> int | None:
    """The host's TSC rate in kHz, which is the rate of a software-emulated guest's TSC
    (QEMU's TCG reads the host's), where the host says it: a TSC of constant rate on a
    virtual machine, whose reported clock is the rate its hypervisor gives. Given to the
    guest (`tsc_early_khz`), it spares the guest calibrating against the emulated PIT,
    which on a busy host under emulation fails, or hangs the boot; a wrong rate would make
    the guest's clock run fast or slow. None: let the guest calibrate."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            return None
    rates, flags = set(), set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "cpu MHz":
            rates.add(value.strip())
        elif key.strip() == "flags":
            flags.update(value.split())
    if len(rates) != 1 or not {"constant_tsc", "hypervisor"} <= flags:
        return None
    try:
        mhz = float(rates.pop())
    except ValueError:
        return None
    return round(mhz * 1000) if 100 <= mhz <= 10_000 else None  # NaN and inf compare false


_CONSOLE_KEEP = 16 * 1024


class BootFailed(OSError):
    """The guest did not come up; the message says what was seen."""


def argv(
    qemu: str,
    image: GuestImage,
    channel: Path | None,
    *,
    memory_mib: int,
    cpus: int,
    accel: Accel,
    config_fd: int | None = None,
    root_share: bool = False,
    home: str | None = None,
    kernel_args: str = "",
    network: bool = False,
    root: str = "/",
    binds: Sequence[tuple[str, str]] = (),
    scratch_fd: int | None = None,
) -> list[str]:
    """QEMU's command line for one guest: no devices but a serial console, the agent's port
    and a config disk (the sandbox's settings: read-only, from `config_fd`, a descriptor
    open for reading that QEMU inherits), no firmware, no reboot. `channel`: the Unix socket
    the port connects to; None: QEMU's own stdin and stdout (the console is then dropped).
    `root_share`: the guest's root is QEMU's own view of `root` (in its jail: the host's
    programs, or an image), shared read-only over 9p, with a tmpfs at `home`, and each of
    `binds` (QEMU's path, the guest's) shared read-only at its place in that root (where the
    root is QEMU's `/`, its jail shows them there already). `network`: a virtio NIC on
    QEMU's user-mode network (none otherwise). `scratch_fd`: a descriptor, open for reading
    and writing, of the workload's scratch disk (an ext4 file system), which the guest
    mounts for its home, /tmp and /dev/shm, and `scratch_fd + 1` one of it open for reading
    only. `kernel_args` go after the kernel's own."""
    cmdline = _CMDLINE
    if accel == "tcg" and (khz := _host_tsc_khz()) is not None:
        cmdline = f"{cmdline} tsc_early_khz={khz}"
    if config_fd is not None:
        cmdline = f"{cmdline} {CONFIG_ARG}"
    shares: list[str] = []
    if root_share:
        cmdline = f"{cmdline} {ROOT_ARG}"
        if home:
            if not _plain_path(home):
                raise ValueError(f"cannot give the guest the home {home!r}")
            cmdline = f"{cmdline} {HOME_ARG}{home}"
        exported = [(ROOT_TAG, root)]
        for n, (path, target) in enumerate(binds):
            if not _plain_path(target) or "," in target or "," in path:
                raise ValueError(f"cannot share {path!r} with the guest at {target!r}")
            exported.append((f"{BIND_TAG}{n}", path))
        if binds:
            cmdline = f"{cmdline} {BINDS_ARG}{','.join(target for _, target in binds)}"
        for tag, path in exported:
            shares += [
                "-fsdev",
                # Its own inode numbers for each file system under `path` (the jail's
                # mounts): the same number on two of them would be one file to the guest.
                f"local,id={tag},path={path},security_model=none,readonly=on,multidevs=remap",
                "-device",
                f"virtio-9p-device,fsdev={tag},mount_tag={tag}",
            ]
    if kernel_args:
        cmdline = f"{cmdline} {kernel_args}"
    if channel is None:
        agent = ["-serial", "null", "-chardev", "stdio,id=agent,signal=off"]
    else:
        agent = ["-serial", "stdio", "-chardev", f"socket,id=agent,path={channel}"]
    drives = []
    if config_fd is not None:
        drives = [
            "-add-fd",
            f"fd={config_fd},set=1",
            "-drive",
            "id=config,file=/dev/fdset/1,format=raw,if=none,readonly=on",
            "-device",
            f"virtio-blk-device,drive=config,serial={CONFIG_SERIAL}",
        ]
    if scratch_fd is not None:
        cmdline = f"{cmdline} {SCRATCH_ARG}"
        drives += [
            # QEMU opens a disk for reading alone as well as for writing: one descriptor of
            # each, the second `scratch_fd + 1`.
            "-add-fd",
            f"fd={scratch_fd},set=2",
            "-add-fd",
            f"fd={scratch_fd + 1},set=2",
            "-drive",
            # A host out of space fails the guest's write, not the whole VM (QEMU's default
            # for a full host disk is to pause the VM).
            "id=scratch,file=/dev/fdset/2,format=raw,if=none,discard=unmap,"
            "werror=report,rerror=report",
            "-device",
            f"virtio-blk-device,drive=scratch,serial={SCRATCH_SERIAL}",
        ]
    nic = []
    if network:
        # QEMU's user-mode network in its own network namespace (the jail's, where slirp4netns
        # carries it on): the guest's gateway 10.0.2.2 is that namespace's empty loopback.
        nic = [
            "-netdev",
            "user,id=net,net=10.0.2.0/24,host=10.0.2.2,dns=10.0.2.3,ipv6=off",
            "-device",
            "virtio-net-device,netdev=net",
        ]
    cpu = "host" if accel == "kvm" else "max"
    return [
        qemu,
        "-accel",
        # Software emulation's cache of translated code: 64 MiB, not QEMU's default of a
        # gigabyte, which would count against the workload's memory limit.
        "kvm" if accel == "kvm" else "tcg,tb-size=64",
        "-cpu",
        cpu,
        "-m",
        str(memory_mib),
        "-smp",
        str(cpus),
        "-M",
        "microvm,x-option-roms=off,isa-serial=on,acpi=on",
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-no-reboot",
        "-kernel",
        str(image.kernel),
        "-initrd",
        str(image.initrd),
        "-append",
        cmdline,
        *agent,
        "-device",
        "virtio-serial-device",
        "-device",
        f"virtserialport,chardev=agent,name={PORT_NAME}",
        *drives,
        *shares,
        *nic,
    ]


@dataclass
class Vm:
    """A running guest: QEMU's process and the host end of the agent's channel."""

    process: asyncio.subprocess.Process
    channel: socket.socket
    workdir: Path
    accel: Accel
    console: bytearray = field(default_factory=bytearray)
    _reader: asyncio.Task[None] | None = None

    def kill(self) -> None:
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGKILL)

    async def wait(self) -> int:
        code = await self.process.wait()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)
        return code

    async def close(self) -> None:
        """Kill the guest, wait for QEMU, and remove what it left."""
        self.kill()
        await self.wait()
        self.channel.close()
        shutil.rmtree(self.workdir, ignore_errors=True)


async def boot(
    image: GuestImage,
    workdir: Path,
    *,
    memory_mib: int = 256,
    cpus: int = 1,
    accel: Accel = "tcg",
    timeout_s: float = 60.0,
    qemu: str | None = None,
) -> Vm:
    """Start a guest in `workdir` (made here, removed by `Vm.close`) and wait until QEMU has
    connected its agent's channel, which it does before the guest runs: the agent's own
    word (`ready`) comes over that channel, and a guest that cannot boot ends it, QEMU's
    reason in `Vm.console`."""
    program = qemu or shutil.which("qemu-system-x86_64")
    if program is None:
        raise BootFailed("qemu-system-x86_64 is not installed (Debian package qemu-system-x86)")
    os.mkdir(workdir, 0o700)
    path = workdir / "agent.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        listener.bind(str(path))
        listener.listen(1)
        listener.setblocking(False)
        process = await asyncio.create_subprocess_exec(
            *argv(program, image, path, memory_mib=memory_mib, cpus=cpus, accel=accel),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        vm_console = bytearray()
        reader = asyncio.create_task(_keep_console(process, vm_console))
        loop = asyncio.get_running_loop()
        accept = asyncio.ensure_future(loop.sock_accept(listener))
        exited = asyncio.ensure_future(process.wait())
        done, _ = await asyncio.wait(
            {accept, exited}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED
        )
        if accept not in done:
            accept.cancel()
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
            await asyncio.gather(reader, return_exceptions=True)
            shutil.rmtree(workdir, ignore_errors=True)
            seen = bytes(vm_console[-2000:]).decode(errors="replace").strip()
            raise BootFailed(f"QEMU did not connect the agent's channel: {seen or 'no output'}")
        exited.cancel()
        channel, _ = accept.result()
    finally:
        listener.close()
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    vm = Vm(process, channel, workdir, accel, vm_console)
    vm._reader = reader
    return vm


async def _keep_console(process: asyncio.subprocess.Process, kept: bytearray) -> None:
    """What the guest's console and QEMU say, the last 16 KiB of it: a guest that writes
    without end costs nothing but this."""
    assert process.stdout is not None
    while data := await process.stdout.read(65536):
        kept += data
        if len(kept) > _CONSOLE_KEEP:
            del kept[: len(kept) - _CONSOLE_KEEP]


async def ready(vm: Vm, timeout_s: float) -> Ready:
    """The guest agent's first frame, `ready`, read off the channel."""
    loop = asyncio.get_running_loop()
    reader = FrameReader()
    deadline = time.monotonic() + timeout_s
    vm.channel.setblocking(False)
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise BootFailed("the guest agent did not say it was ready in time")
        data = await asyncio.wait_for(loop.sock_recv(vm.channel, 65536), left)
        if not data:
            raise BootFailed("the guest ended before its agent was ready")
        for event, _ in reader.feed(data):
            if isinstance(event, Ready):
                return event
            raise BootFailed(f"the guest agent's first word was not `ready`: {event!r}")


def kvm_open_to_workloads(path: str = "/dev/kvm") -> bool:
    """Whether a workload's VMM, which runs as the workload's own host ids and no group of
    the host's, may open `path` for reading and writing (Debian's udev rules make it
    0666; a host that keeps it to the `kvm` group keeps its VMMs on software emulation)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return stat.S_ISCHR(mode) and mode & 0o006 == 0o006


async def probe(image: GuestImage, workdir: Path, timeout_s: float = 20.0) -> Accel:
    """KVM where a guest boots under it to its agent's `ready` within `timeout_s` and the
    workloads' VMMs may open it too, else TCG."""
    if not kvm_open_to_workloads():
        return "tcg"
    try:
        vm = await boot(image, workdir, accel="kvm", timeout_s=timeout_s)
    except BootFailed:
        return "tcg"
    try:
        await ready(vm, timeout_s)
    except (BootFailed, TimeoutError, OSError, GuestProtocolError):
        return "tcg"
    finally:
        await vm.close()
    return "kvm"


def _plain_path(path: str) -> bool:
    """An absolute path the guest's init can take from its command line as it is."""
    return path.startswith("/") and not any(c.isspace() or c in "\"'\\$`" for c in path)
