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

import contextlib
import dataclasses
import fcntl
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from treadle.domain.resources import Tier
from treadle.guest.vmboot import settings_frame
from treadle.protocol.messages import AssignSpec
from treadle.shuttle.microvm import qemu
from treadle.shuttle.microvm.image import GuestImage, touch
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

if TYPE_CHECKING:
    from treadle.shuttle.live.pool import WarmPool

__all__ = ["GUEST_MIN_MIB", "VMM_OVERHEAD_MIB", "MicrovmLauncher"]

# Where the jail shows QEMU the guest image.
_IMAGE_AT = "/.treadle/guest"
# The config disk's descriptor in QEMU: above what the jail gives bubblewrap.
CONFIG_FD = 100
_SECTOR = 512
# The least memory a guest boots and runs its agent in: the kernel and the unpacked
# initramfs (busybox, the agent and its Python) take most of 100 MiB.
GUEST_MIN_MIB = 192
# What QEMU itself holds beyond the guest's memory (software emulation's translated code
# included, capped by `tb-size`): added to the workload's cgroup limit.
VMM_OVERHEAD_MIB = 160
_GUEST_HOME = "/work"


class MicrovmLauncher:
    def __init__(
        self,
        jail: NamespaceLauncher,
        image: GuestImage,
        *,
        accel: qemu.Accel = "tcg",
        qemu_path: str | None = None,
    ) -> None:
        program = qemu_path or shutil.which("qemu-system-x86_64")
        if program is None:
            raise FileNotFoundError("qemu-system-x86_64 is not installed")
        self._jail = jail
        self._image = image
        self._accel = accel
        self._qemu = os.path.realpath(program)
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

    def prepare(
        self,
        spec: AssignSpec,
        workdir: Path,
        *,
        binds: Sequence[ReadOnlyBind] = (),
        freezable: bool = True,
        users: bool = False,
        waiting: bool = False,
    ) -> Attempt:
        """See `Launcher.prepare`. The guest's root is QEMU's view of the host's programs
        (shared read-only), so `binds` (the agent's runtime) are shown to QEMU's jail and
        through it to the guest. `waiting`: the VM boots ahead of its workload, knowing only
        its shape; it waits, before any confinement, for `settings` on its channel."""
        if spec.image is not None:
            raise ValueError("the microvm tier runs the guest's own programs: no images yet")
        if spec.network and self._jail.slirp is None:
            raise NoNetwork(NO_NETWORK)
        home = spec.workdir or _GUEST_HOME
        touch(self._image)  # in use: no other version's build prunes it
        settings = self._settings(spec, users)
        if waiting:  # the guest waits for them on its channel (`treadle.guest.vmboot`)
            settings = {"settings": "channel"}
        config = _memfd_read_only(
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
                        CAPABILITY_NUMBERS[name] for name in (ROOT_CAPABILITIES if users else ())
                    ),
                    "seccomp": self._jail.seccomp_program.hex(),
                    "home": home,
                    "masked": MASKED_PATHS,
                    "readonly": READONLY_PATHS,
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
        try:
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
                binds=[*binds, ReadOnlyBind(self._image.kernel.parent, _IMAGE_AT)],
                freezable=freezable,
                devices=["/dev/kvm"] if self._accel == "kvm" else [],
            )
        except BaseException:
            os.close(config)
            raise
        return _MicrovmAttempt(attempt, config)

    def _settings(self, spec: AssignSpec, users: bool) -> dict[str, Any]:
        """What of the config only the workload says, not its VM's shape: its environment,
        and the node's clock."""
        env = environment(spec, spec.workdir or _GUEST_HOME)
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
    """The config disk's bytes (what `treadle.guest.vmboot` reads): JSON (no NUL in it: JSON
    escapes control characters), padded with NULs to whole sectors."""
    data = json.dumps(config, ensure_ascii=True).encode()
    return data + b"\0" * (-len(data) % _SECTOR or _SECTOR)


class _MicrovmAttempt:
    """The jail's attempt, with the config disk's descriptor given to QEMU and closed here
    once the attempt is over."""

    def __init__(self, inner: Attempt, config: int) -> None:
        self._inner = inner
        self._config: int | None = config
        launch = inner.launch
        self._launch = dataclasses.replace(launch, fds={**launch.fds, CONFIG_FD: config})

    @property
    def launch(self) -> Launch:
        return self._launch

    def _close(self) -> None:
        if self._config is not None:
            with contextlib.suppress(OSError):
                os.close(self._config)
            self._config = None

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
