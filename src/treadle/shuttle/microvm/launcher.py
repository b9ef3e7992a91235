"""The microvm tier's launcher: each workload a QEMU process booting the guest image, and
QEMU itself jailed by the namespace tier, the sandbox layer every tier shares.

So the VMM runs as the workload's own unprivileged host ids, in new user, PID, mount,
network, IPC and UTS namespaces, in the workload's cgroup (its memory plus the VMM's own),
under the sandbox layer's seccomp filter, with the host's programs read-only and no network:
a guest that escaped QEMU would stand where a namespace-tier workload stands. The guest agent
talks over QEMU's stdin and stdout (its virtio-serial port's chardev), which are the jail's,
so Shuttle's side is the same pipes, `GuestLink` and checks as in every other tier.

What the guest needs of the workload (its environment) travels on a read-only config disk:
JSON padded to whole sectors, read by the guest agent, in a memfd that QEMU inherits, so
that a workload's environment (its secrets, often) never lies in a file.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import json
import math
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from treadle.domain.resources import Tier
from treadle.guest.vmboot import CONFIG_MAX, settings_frame
from treadle.protocol.messages import AssignSpec
from treadle.shuttle.microvm import qemu
from treadle.shuttle.microvm.image import GuestImage, touch
from treadle.shuttle.oci.rootfs import mount_point
from treadle.shuttle.runtimes.base import ExitStatus
from treadle.shuttle.runtimes.namespace import NO_NETWORK, NamespaceLauncher, NoNetwork
from treadle.shuttle.runtimes.process import Attempt, Launch, ReadOnlyBind, environment
from treadle.shuttle.sandbox.ids import SANDBOX_GID, SANDBOX_UID
from treadle.shuttle.sandbox.policy import (
    AGENT_USER_ENV,
    CAPABILITY_NUMBERS,
    MASKED_PATHS,
    READONLY_PATHS,
    ROOT_CAPABILITIES,
)
from treadle.shuttle.sandbox.state import private_dir, state_root

if TYPE_CHECKING:
    from treadle.shuttle.live.pool import WarmPool
    from treadle.shuttle.oci.fetch import ImageFetcher

__all__ = ["GUEST_MIN_MIB", "VMM_OVERHEAD_MIB", "MicrovmLauncher"]

# Where the jail shows QEMU the guest image.
_IMAGE_AT = "/.treadle/guest"
# The config and scratch disks' descriptors in QEMU: above what the jail gives bubblewrap
# (the scratch disk's twice: for reading and writing, and for reading alone).
CONFIG_FD = 100
SCRATCH_FD = 101
_SECTOR = 512
# The least memory a guest boots and runs its agent in: the kernel and the unpacked
# initramfs (busybox, the agent and its Python) take most of 100 MiB.
GUEST_MIN_MIB = 192
# What QEMU itself holds beyond the guest's memory (software emulation's translated code
# included, capped by `tb-size`): added to the workload's cgroup limit.
VMM_OVERHEAD_MIB = 160
_GUEST_HOME = "/work"
# Where the jail shows QEMU a function's image, to share as the guest's root.
_IMAGE_ROOT = "/.treadle/image"
# What the guest's init mounts over in its root (`image.INIT`).
_GUEST_MOUNTS = ("/dev", "/proc", "/sys", "/tmp")


class MicrovmLauncher:
    def __init__(
        self,
        jail: NamespaceLauncher,
        image: GuestImage,
        *,
        accel: qemu.Accel = "tcg",
        qemu_path: str | None = None,
        images: ImageFetcher | None = None,
        scratch_dir: Path | None = None,
    ) -> None:
        program = qemu_path or shutil.which("qemu-system-x86_64")
        if program is None:
            raise FileNotFoundError("qemu-system-x86_64 is not installed")
        self._jail = jail
        self._image = image
        self._accel = accel
        self._qemu = os.path.realpath(program)
        self._images = images
        # Where scratch disks are made: the node's own disk, whose free space it advertises.
        self._scratch_dir = scratch_dir or state_root() / "microvm-scratch"
        # Where VMs booted ahead of their workloads wait (`treadle.shuttle.live.pool`).
        self.pool: WarmPool | None = None

    @property
    def tier(self) -> Tier:
        return Tier.MICROVM

    @property
    def gives_network(self) -> bool:
        """Network goes to a guest through its VMM's jail, which gets the namespace tier's
        (slirp4netns, fenced off this host, its cloud and Weaver)."""
        return self._jail.gives_network

    @property
    def accel(self) -> qemu.Accel:
        return self._accel

    async def fetch_image(self, spec: AssignSpec) -> None:
        """See `ImageLauncher.fetch_image`: from the node's image store, as the oci tiers'."""
        if spec.image is None:
            return
        if self._images is None:
            raise ValueError("this node runs no images in the microvm tier")
        await self._images.fetch(spec.image)

    def environment(self, spec: AssignSpec) -> dict[str, str]:
        """The workload's environment in its guest: its image's variables under its own."""
        image_env = (
            ()
            if spec.image is None or self._images is None
            else (self._images.fetched(spec.image).env)
        )
        return environment(spec, spec.workdir or _GUEST_HOME, image_env)

    def prepare(
        self,
        spec: AssignSpec,
        workdir: Path,
        *,
        binds: Sequence[ReadOnlyBind] = (),
        freezable: bool = True,
        users: bool = False,
        waiting: bool = False,
        scratch: int | None = None,
    ) -> Attempt:
        """See `Launcher.prepare`. The guest's root is QEMU's view of the host's programs
        (shared read-only), so `binds` (the agent's runtime) are shown to QEMU's jail and
        through it to the guest. `waiting`: the VM boots ahead of its workload, knowing only
        its shape; it waits, before any confinement, for `settings` on its channel. `scratch`:
        its scratch disk (`scratch_disk`), which the attempt then owns; None: made here."""
        if scratch is None:
            scratch = _scratch_disk(self._scratch_dir, max(spec.resources.disk_mib, 1))
        try:
            return self._prepare(spec, workdir, binds, freezable, users, waiting, scratch)
        finally:
            os.close(scratch)  # the attempt holds a copy of its own

    async def scratch_disk(self, spec: AssignSpec) -> int:
        """A scratch disk for `spec`'s VM, for `prepare`, made off the event loop."""
        made = asyncio.ensure_future(
            asyncio.to_thread(_scratch_disk, self._scratch_dir, max(spec.resources.disk_mib, 1))
        )
        try:
            return await asyncio.shield(made)
        except asyncio.CancelledError:  # not the caller's any more: closed once made
            made.add_done_callback(_close_made)
            raise

    def _prepare(
        self,
        spec: AssignSpec,
        workdir: Path,
        binds: Sequence[ReadOnlyBind],
        freezable: bool,
        users: bool,
        waiting: bool,
        scratch: int,
    ) -> Attempt:
        if spec.network and self._jail.slirp is None:
            raise NoNetwork(NO_NETWORK)
        home = spec.workdir or _GUEST_HOME
        root, shares, jail_binds = "/", [], list(binds)
        if spec.image is not None:
            # The guest's root is the image, shared read-only from where the jail shows it
            # to QEMU; the agent's runtime (`binds`) is shared beside it, at its place.
            if self._images is None:
                raise ValueError("this node runs no images in the microvm tier")
            rootfs = self._images.fetched(spec.image)
            for target in (*_GUEST_MOUNTS, home, *(bind.target for bind in binds)):
                mount_point(rootfs, target)  # directories, not links out of the image
            root = _IMAGE_ROOT
            shares = [(bind.target, bind.target) for bind in binds]
            jail_binds.append(ReadOnlyBind(rootfs.path, _IMAGE_ROOT))
        touch(self._image)  # in use: no other version's build prunes it
        settings = self._settings(spec, users)
        if waiting:  # the guest waits for them on its channel (`treadle.guest.vmboot`)
            settings = {"settings": "channel"}
        fds: dict[int, int] = {}
        try:
            fds[SCRATCH_FD + 1] = os.open(f"/proc/self/fd/{scratch}", os.O_RDONLY | os.O_CLOEXEC)
            fds[CONFIG_FD] = _memfd_read_only(
                "treadle-config",
                _config_disk(
                    {
                        "argv": spec.argv,
                        "env": {},
                        "time": None,
                        **settings,
                        # Without users of its own, everything runs as the sandbox's user.
                        "user": None if users else [SANDBOX_UID, SANDBOX_GID],
                        "capabilities": sorted(
                            CAPABILITY_NUMBERS[name]
                            for name in (ROOT_CAPABILITIES if users else ())
                        ),
                        "seccomp": self._jail.seccomp_program.hex(),
                        "home": home,
                        "masked": MASKED_PATHS,
                        "readonly": READONLY_PATHS,
                        # Its writable places are on its scratch disk, which bounds them.
                        "scratch": True,
                        # The same fence again, in the guest's own routes: refused there at once.
                        "network": None
                        if not spec.network or self._jail.slirp is None
                        else {"fence": self._jail.slirp.fenced()},
                        "limits": {
                            "memory_mib": spec.resources.memory_mib,
                            "pids": self._jail.limits.pids_max,
                            "disk_mib": spec.resources.disk_mib,
                        },
                    }
                ),
            )
            guest = GuestImage(
                Path(_IMAGE_AT) / self._image.kernel.name,
                Path(_IMAGE_AT) / self._image.initrd.name,
                self._image.digest,
            )
            memory = _guest_mib(spec)
            command = qemu.argv(
                self._qemu,
                guest,
                None,
                memory_mib=memory,
                cpus=max(1, math.ceil(spec.resources.cpu_millicores / 1000)),
                accel=self._accel,
                config_fd=CONFIG_FD,
                root_share=True,
                home=home,
                network=spec.network,
                root=root,
                binds=shares,
                scratch_fd=SCRATCH_FD,
            )
            jailed = spec.model_copy(
                update={
                    "workdir": home,
                    "argv": command,
                    "env": {},
                    "network": spec.network,
                    "resources": spec.resources.model_copy(
                        update={"memory_mib": self.footprint_mib(spec)}
                    ),
                }
            )
            attempt = self._jail.prepare(
                jailed,
                workdir,
                binds=[*jail_binds, ReadOnlyBind(self._image.kernel.parent, _IMAGE_AT)],
                freezable=freezable,
                devices=["/dev/kvm"] if self._accel == "kvm" else [],
            )
        except BaseException:
            for fd in fds.values():
                os.close(fd)
            raise
        # Its own copy of the scratch disk's descriptor: the caller closes the one it gave.
        return _MicrovmAttempt(attempt, {**fds, SCRATCH_FD: os.dup(scratch)})

    def _settings(self, spec: AssignSpec, users: bool) -> dict[str, Any]:
        """What of the config only the workload says, not its VM's shape: its environment,
        and the node's clock."""
        env = self.environment(spec)
        if users:
            env[AGENT_USER_ENV] = f"{SANDBOX_UID}:{SANDBOX_GID}"
        return {"env": env, "time": time.time()}

    def settings(self, spec: AssignSpec, *, users: bool = False) -> bytes:
        """The frame that hands a VM prepared `waiting` (for a workload of `shape(spec)`)
        over to `spec`."""
        return settings_frame(self._settings(spec, users))

    @staticmethod
    def shape(spec: AssignSpec, binds: Sequence[ReadOnlyBind] = ()) -> str:
        """What a VM is booted with, from its workload: two workloads of one shape can take
        each other's VM, as long as it waits for their settings (`prepare(waiting=True)`)."""
        return json.dumps(
            {
                "argv": spec.argv,
                "resources": spec.resources.model_dump(mode="json"),
                "network": spec.network,
                "home": spec.workdir or _GUEST_HOME,
                "image": spec.image,
                "binds": [[str(bind.source), bind.target] for bind in binds],
            },
            sort_keys=True,
        )

    @staticmethod
    def footprint_mib(spec: AssignSpec) -> int:
        """The memory its VM may hold: the guest's, and QEMU's own."""
        return _guest_mib(spec) + VMM_OVERHEAD_MIB


def _guest_mib(spec: AssignSpec) -> int:
    return max(spec.resources.memory_mib, GUEST_MIN_MIB)


def _close_made(made: asyncio.Future[int]) -> None:
    if not made.cancelled() and made.exception() is None:
        os.close(made.result())


def _scratch_disk(directory: Path, disk_mib: int) -> int:
    """A descriptor, open for reading and writing, of a new file of `disk_mib` on the node's
    disk (sparse, and unlinked from the start: it is gone once QEMU and this process close
    it, whatever happens to either) holding an empty ext4 file system: the guest's writable
    places. No journal (it lives as long as its VM); its inode tables left for the guest's
    kernel to initialise (`uninit_bg`), so that making one writes next to nothing whatever
    its size."""
    fd = os.open(private_dir(directory), os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, disk_mib << 20)
        subprocess.run(
            [
                "mkfs.ext4",
                "-q",
                "-F",
                "-O",
                "^has_journal,^metadata_csum,uninit_bg",
                "-E",
                "lazy_itable_init=1,nodiscard,root_owner=0:0",
                "-m",
                "0",
                f"/dev/fd/{fd}",
            ],
            pass_fds=[fd],
            check=True,
            capture_output=True,
            timeout=60,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        os.close(fd)
        raise OSError(f"cannot make the VM's scratch disk: {exc}") from exc
    except BaseException:
        os.close(fd)
        raise
    return fd


def _memfd_read_only(name: str, data: bytes) -> int:
    """A descriptor, open for reading only, of a sealed memfd holding `data` (QEMU takes a
    read-only disk's descriptor only when it is open for reading only)."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        fcntl.fcntl(
            fd,
            fcntl.F_ADD_SEALS,
            fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL,
        )
        return os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.close(fd)


def _config_disk(config: dict[str, Any]) -> bytes:
    """The config disk's bytes (what `treadle.guest.vmboot` reads, up to its limit): JSON
    (no NUL in it: JSON escapes control characters), padded with NULs to whole sectors."""
    data = json.dumps(config, ensure_ascii=True).encode()
    if len(data) >= CONFIG_MAX:
        raise ValueError("the workload's settings are too large for its VM")
    return data + b"\0" * (-len(data) % _SECTOR or _SECTOR)


class _MicrovmAttempt:
    """The jail's attempt, with the config and scratch disks' descriptors given to QEMU and
    closed here once QEMU holds its own copies, or the attempt is over."""

    def __init__(self, inner: Attempt, fds: dict[int, int]) -> None:
        self._inner = inner
        self._fds = dict(fds)
        launch = inner.launch
        self._launch = dataclasses.replace(launch, fds={**launch.fds, **fds})

    @property
    def launch(self) -> Launch:
        return self._launch

    def _close(self) -> None:
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)

    async def spawned(self, pid: int) -> None:
        self._close()  # QEMU holds its own copy now
        await self._inner.spawned(pid)

    def kill(self) -> None:
        self._inner.kill()

    def exited(self, settled: Callable[[], None]) -> None:
        self._inner.exited(settled)

    def finish(self, status: ExitStatus) -> ExitStatus:
        try:
            return self._inner.finish(status)
        finally:
            self._close()

    def abandon(self) -> None:
        try:
            self._inner.abandon()
        finally:
            self._close()

    def __getattr__(self, name: str) -> Any:
        # What tiers add to the protocol (pause, resume, counters) is the jail's.
        return getattr(self._inner, name)
