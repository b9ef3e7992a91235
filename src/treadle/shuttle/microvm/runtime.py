"""The microvm tier's runtime: each execution attempt a VM of its own, booted for it and
destroyed after it, never reused.

The VM is a sandbox of one process (`LiveSandbox` over `MicrovmLauncher`): once its guest
agent is ready, the attempt's work dir files (args, source) are written through the agent,
the program is started by it with the attempt's environment and stdin, its result fd (3)
open on a file of the work dir, and its output streamed as it comes. When it ends, the
result file is read back, with the same bound and parsing as every tier's (`ResultLines`),
and the VM is stopped. The timeout and a kill end the VM itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import signal
import subprocess
import tempfile
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from treadle.domain.resources import Tier
from treadle.protocol.messages import AssignSpec, Usage
from treadle.shuttle.live.box import LiveSandbox, SandboxSpec
from treadle.shuttle.live.link import GuestError, GuestProcess, LinkBroken
from treadle.shuttle.microvm.image import PACKAGE_DIR, build, find_package
from treadle.shuttle.microvm.launcher import MicrovmLauncher
from treadle.shuttle.microvm.qemu import probe
from treadle.shuttle.runtimes import bwrap
from treadle.shuttle.runtimes.base import ExitStatus, RuntimeHandle, SpawnFailed, Stream
from treadle.shuttle.runtimes.namespace import NamespaceLauncher
from treadle.shuttle.runtimes.process import (
    RESULT_FD,
    RESULT_LINE_LIMIT,
    ResultLines,
    environment,
    workdir_files,
)
from treadle.shuttle.sandbox import exits

if TYPE_CHECKING:
    from treadle.shuttle.oci.fetch import ImageFetcher

__all__ = ["MicrovmExecution", "MicrovmRuntime", "available"]

log = logging.getLogger(__name__)

_WORK_DIR = "/work"
_RESULT = ".treadle-result"
# Opens the result fd on the result file, then becomes the program ($0 is the file).
_WITH_RESULT_FD = f'exec {RESULT_FD}>"$0"; exec "$@"'
# As in every tier: a process the program left may hold its output open this long after
# its exit, no longer.
_DRAIN_S = 1.0


def available(
    jail: NamespaceLauncher, images: ImageFetcher | None = None, scratch_dir: Path | None = None
) -> tuple[MicrovmRuntime | None, str]:
    """The tier's runtime on this host, and what was found (or why there is none): the
    guest image built (or found) from the kernel package, and the accelerator a real boot
    chose. `images`: where functions' images come from (None: it runs none); `scratch_dir`:
    where VMs' scratch disks are made (`MicrovmLauncher`). Blocking: a
    build where none is cached (seconds), and a trial boot under KVM where /dev/kvm is
    there."""
    if shutil.which("qemu-system-x86_64") is None:
        return None, "qemu-system-x86_64 is not installed (Debian package qemu-system-x86)"
    package = find_package()
    if package is None:
        return None, f"no kernel package in {PACKAGE_DIR}: run scripts/build-guest"
    try:
        image = build(package)
    except (OSError, ValueError, subprocess.SubprocessError) as exc:
        return None, f"cannot build the guest image: {exc}"
    with (
        tempfile.TemporaryDirectory(prefix="treadle-microvm-probe-") as scratch,
        ThreadPoolExecutor(1, thread_name_prefix="treadle-probe") as pool,
    ):
        accel = pool.submit(asyncio.run, probe(image, Path(scratch) / "vm")).result()
    launcher = MicrovmLauncher(jail, image, accel=accel, images=images, scratch_dir=scratch_dir)
    return MicrovmRuntime(launcher), f"guest {image.digest}, {accel}"


class MicrovmRuntime:
    def __init__(self, launcher: MicrovmLauncher) -> None:
        self.launcher = launcher

    @property
    def tier(self) -> Tier:
        return Tier.MICROVM

    @property
    def gives_network(self) -> bool:
        return self.launcher.gives_network

    async def start(self, spec: AssignSpec, workdir: Path) -> RuntimeHandle:
        home = spec.workdir or _WORK_DIR
        try:
            # Found, and executable, before a VM boots for it: a missing program ends as
            # "spawn_failed", as in every tier, not as an exit code. (An image's programs
            # are its own: a missing one fails in the guest, as in the oci tiers.)
            files = {name: mode for name, _, mode in workdir_files(spec)}
            if spec.image is None:
                bwrap.resolve_in_sandbox(spec.argv[0], environment(spec, home)["PATH"], files)
        except (OSError, ValueError) as exc:
            return SpawnFailed(f"treadle: {exc}\n")
        sandbox_spec = SandboxSpec(
            id=spec.id,
            incarnation=spec.attempt,
            tenant_id=spec.tenant_id,
            resources=spec.resources,
            isolation=Tier.MICROVM,
            env={},
            image=spec.image,
            network=spec.network,
            home=home,
        )
        try:
            sandbox = await LiveSandbox.start(self.launcher, sandbox_spec, workdir)
        except (OSError, ValueError) as exc:
            return SpawnFailed(f"treadle: {exc}\n")
        execution = MicrovmExecution(sandbox, spec, home, self.launcher.environment(spec))
        try:
            await execution.begin()
        except (GuestError, LinkBroken, OSError, ValueError) as exc:
            await sandbox.stop(grace_s=0)
            return SpawnFailed(f"treadle: cannot start the program in its VM: {exc}\n")
        return execution


class MicrovmExecution:
    def __init__(
        self, sandbox: LiveSandbox, spec: AssignSpec, home: str, env: dict[str, str]
    ) -> None:
        self._sandbox = sandbox
        self._spec = spec
        self._home = home
        self._env = env
        self._process: GuestProcess | None = None
        self._kill_reason: str | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._status: asyncio.Task[ExitStatus] | None = None
        self._started = asyncio.get_running_loop().time()

    @property
    def sandbox(self) -> LiveSandbox:
        """The VM it runs in."""
        return self._sandbox

    @property
    def home(self) -> str:
        """Its work dir, in the VM."""
        return self._home

    async def begin(self) -> None:
        spec, link = self._spec, self._sandbox.link
        for name, data, mode in workdir_files(spec):
            await link.write_file(f"{self._home}/{name}", data, mode=mode)
        result = f"{self._home}/{_RESULT}"
        self._process = await link.exec(
            ["/bin/sh", "-c", _WITH_RESULT_FD, result, *spec.argv],
            env=self._env,
            cwd=self._home,
            stdin=spec.stdin is not None,
            drain_s=_DRAIN_S,
        )
        if spec.stdin is not None:
            await self._process.write_stdin(spec.stdin.encode())
            self._process.close_stdin()
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(spec.timeout_s, self._end, exits.TIMEOUT)

    async def output(self) -> AsyncIterator[tuple[Stream, bytes]]:
        assert self._process is not None
        with contextlib.suppress(LinkBroken):
            async for stream, data in self._process.output():
                yield ("stderr" if stream == "stderr" else "stdout"), data

    async def wait(self) -> ExitStatus:
        if self._status is None:
            self._status = asyncio.ensure_future(self._finish())
        return await asyncio.shield(self._status)

    async def _finish(self) -> ExitStatus:
        assert self._process is not None
        code: int | None = None
        result = None
        try:
            end = await self._process.wait()
            code = -end.signal if end.signal else end.exit_code
            if self._kill_reason is None:
                result = await self._result()
        except (LinkBroken, GuestError):
            pass  # the VM ended under it: killed, timed out, or broken
        finally:
            if self._timer is not None:
                self._timer.cancel()
            ended = await self._sandbox.stop(grace_s=0)
        counters = self._sandbox.final_counters
        reason = self._kill_reason
        if reason is not None and code is None:
            code = -signal.SIGKILL  # its VM was killed, and it with it
        elif reason is None and code is None:
            reason = ended.reason or "node_error"
        elif reason is None and code is not None and code < 0:
            reason = exits.killed_by(-code)
        wall = (asyncio.get_running_loop().time() - self._started) * 1000
        cpu_ns = None if counters is None else counters.cpu_ns
        usage = Usage(wall_ms=wall, cpu_ms=None if cpu_ns is None else cpu_ns / 1e6)
        return ExitStatus(code, reason, result, usage, counters=counters)

    async def _result(self) -> object:
        lines = ResultLines(RESULT_LINE_LIMIT)
        try:
            _, chunks = await self._sandbox.link.read_file(f"{self._home}/{_RESULT}")
            async for chunk in chunks:
                lines.feed(chunk)
        except GuestError:
            return None  # the program closed fd 3 and removed the file: no result
        return lines.value()

    def _end(self, reason: str) -> None:
        if self._kill_reason is None:
            self._kill_reason = reason
        self._sandbox.kill(reason)

    def kill(self) -> None:
        self._end(exits.CANCELLED)
