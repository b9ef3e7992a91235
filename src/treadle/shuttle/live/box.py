"""A long-lived sandbox on this node: one boundary, the guest agent as its first program, and
every process and file operation a client asks for done by that agent inside the boundary.

It is built from the same launchers as executions (`treadle.shuttle.runtimes`): the same
namespaces, cgroup and limits, seccomp filter, ids and network as an execution of the same
tier, so the escape suite's guarantees hold for whatever runs in it. Only what runs differs:
the guest agent (`treadle.guest.agent`) instead of one program, and the sandbox lives until
it is stopped.

The agent runs on Shuttle's own Python runtime (`agent_runtime`), never on a Python of the
sandbox's: the runtime's directory is bound read-only at `agent_runtime.MOUNT_POINT` in every
tier that mounts (the process tier, which mounts nothing, runs it from its host directory).
So the agent starts the same in any image, one without Python included, and an image cannot
put a `python3` of its own in its place.

Pause freezes the sandbox's cgroup (v1's freezer or v2's cgroup.freeze): every process in it,
the agent included, stops where it is, its memory kept; resume thaws it. A sandbox paused on a
node without a freezer cannot be paused (`Unsupported`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Protocol, runtime_checkable

from treadle.domain.resources import Resources, Tier
from treadle.domain.sandbox import boundary_resources
from treadle.guest.sudo import SOCKET_NAME
from treadle.protocol.messages import AssignSpec, Usage
from treadle.shuttle import reaper
from treadle.shuttle.live import agent_runtime
from treadle.shuttle.live.link import GuestLink, LinkBroken
from treadle.shuttle.microvm.launcher import MicrovmLauncher
from treadle.shuttle.runtimes._spawn import spawn_async
from treadle.shuttle.runtimes.base import ExitStatus
from treadle.shuttle.runtimes.namespace import NamespaceLauncher
from treadle.shuttle.runtimes.oci import OciLauncher
from treadle.shuttle.runtimes.process import (
    RESULT_FD,
    Attempt,
    ImageLauncher,
    Launcher,
    ReadOnlyBind,
)
from treadle.shuttle.sandbox import exits
from treadle.shuttle.sandbox.cgroups import GroupUsage
from treadle.shuttle.sandbox.policy import AGENT_SUDO_ENV, PATH

__all__ = ["LiveSandbox", "SandboxSpec", "Unsupported"]

log = logging.getLogger(__name__)

_READY_TIMEOUT_S = 30.0
_STOP_GRACE_S = 5.0
# The agent's source, run with `-I -S -c` on the agent's runtime: nothing is written into the
# sandbox, and nothing of a Python environment (site-packages, PYTHON* variables) is used.
AGENT_SOURCE = resources.files("treadle.guest").joinpath("agent.py").read_text()
_STDERR_KEEP = 16 * 1024


class Unsupported(Exception):
    """This node cannot do that for this sandbox (pause without a freezer, say)."""


@runtime_checkable
class Pausable(Protocol):
    """An attempt whose tier can freeze it in place: the namespace tier by its cgroup's
    freezer, the oci tiers by their runtime's own `pause` (gVisor's stops its sandbox)."""

    async def pause(self) -> None: ...

    async def resume(self) -> None: ...


@runtime_checkable
class Meterable(Protocol):
    """An attempt whose cgroup's counters can be read while it runs."""

    def counters(self) -> GroupUsage | None: ...


@dataclass(frozen=True)
class SandboxSpec:
    id: str
    incarnation: int
    tenant_id: str
    resources: Resources
    isolation: Tier
    env: dict[str, str]
    image: str | None = None
    network: bool = False
    # The Python to run the agent on where `assign_spec` is given none; `start` always gives
    # the agent's runtime.
    python: str = "python3"
    # Where its work dir is (None: the sandbox layer's /work): HOME, where processes and
    # relative paths start.
    home: str | None = None
    # Its user may become root with `sudo` (`treadle.guest.sudo`), where the tier has users.
    sudo: bool = False

    def assign_spec(
        self, python: Sequence[str] | None = None, tools: str | None = None
    ) -> AssignSpec:
        """The sandbox as an attempt whose program is the agent, run by the command `python`
        (`AgentRuntime.argv`; default: `self.python`). `tools`: where the sandbox sees the
        runtime's programs (`agent_runtime.TOOLS`); None: it does not (no `sudo` then)."""
        interpreter = [self.python] if python is None else list(python)
        env = self.env
        if self.sudo and tools is not None:
            # First on PATH: a host's own sudo cannot work in a sandbox (no_new_privs).
            env = {**env, AGENT_SUDO_ENV: SOCKET_NAME, "PATH": f"{tools}:{env.get('PATH', PATH)}"}
        return AssignSpec(
            id=self.id,
            attempt=self.incarnation,
            tenant_id=self.tenant_id,
            function="sandbox",
            version=1,
            argv=[*interpreter, "-I", "-S", "-c", AGENT_SOURCE],
            env=env,
            # A sandbox ends when stopped; its TTL is Weaver's to enforce.
            timeout_s=365 * 24 * 3600,
            resources=boundary_resources(self.resources),
            isolation=self.isolation,
            image=self.image,
            network=self.network,
            workdir=self.home,
            no_args=True,
        )


class LiveSandbox:
    """One running sandbox. `link` reaches its agent; `ended` is done, with how the sandbox
    ended, once everything of it is gone."""

    def __init__(self, spec: SandboxSpec, attempt: Attempt, pid: int, link: GuestLink) -> None:
        self.spec = spec
        self.link = link
        self.pid = pid
        self._attempt = attempt
        self._loop = asyncio.get_running_loop()
        pidfd = os.pidfd_open(pid)
        self._pidfd: int | None = pidfd
        self._started = time.monotonic()
        self._kill_reason: str | None = None
        self._frozen = False
        self.final_counters: GroupUsage | None = None
        self.ended: asyncio.Future[ExitStatus] = self._loop.create_future()
        self._loop.add_reader(pidfd, self._on_exit)

    @classmethod
    async def start(cls, launcher: Launcher, spec: SandboxSpec, workdir: Path) -> LiveSandbox:
        """Start the sandbox and wait for its agent's word; raises OSError or ValueError
        when it cannot start (the reason in the message)."""
        runtime = await agent_runtime.ensure_async()
        binds: tuple[ReadOnlyBind, ...] = ()
        if launcher.tier is Tier.PROCESS:
            assign = spec.assign_spec(runtime.argv(str(runtime.path)))
        else:
            binds = (ReadOnlyBind(runtime.path, agent_runtime.MOUNT_POINT),)
            assign = spec.assign_spec(
                runtime.argv(agent_runtime.MOUNT_POINT), tools=agent_runtime.TOOLS
            )
        if assign.image is not None:
            if not isinstance(launcher, ImageLauncher):
                raise ValueError(f"the {launcher.tier} tier cannot run an image")
            await launcher.fetch_image(assign)
        # Where the tier can, the sandbox has users of its own (`users`): its agent acts
        # as any of them (`treadle.guest.agent`).
        if isinstance(launcher, NamespaceLauncher):
            attempt: Attempt = launcher.prepare(
                assign, workdir, binds=binds, freezable=True, users=True
            )
        elif isinstance(launcher, (OciLauncher, MicrovmLauncher)):
            attempt = launcher.prepare(assign, workdir, binds=binds, users=True)
        else:
            attempt = launcher.prepare(assign, workdir, binds=binds)
        launch = attempt.launch
        if launch.result is not None:
            for fd in launch.result:  # no result channel: a sandbox has no single result
                os.close(fd)
        to_r, to_w = os.pipe2(os.O_CLOEXEC)
        from_r, from_w = os.pipe2(os.O_CLOEXEC)
        null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        child = [to_r, from_w, null]
        try:
            # fd 3 is the result fd of executions, which the oci tiers pass into the
            # container: /dev/null, read-only, so that nothing of the runtime's (its log
            # file, say) takes that number and reaches the sandbox.
            fds = {0: to_r, 1: from_w, 2: null, RESULT_FD: null, **launch.fds}
            pid = await spawn_async(
                launch.program, launch.argv, launch.env, launch.cwd, fds, ids=launch.ids
            )
        except BaseException:
            for fd in (*child, to_w, from_r):
                os.close(fd)
            attempt.abandon()
            raise
        for fd in child:
            os.close(fd)
        reaper.track(pid)
        owner: list[LiveSandbox] = []

        def broken(reason: str) -> None:
            # The agent is the tenant's to replace: one that breaks the protocol ends its
            # sandbox, whatever else it still runs.
            log.warning("sandbox %s: %s", spec.id, reason)
            for sandbox in owner:
                sandbox.kill("protocol_error")

        link = GuestLink(to_w, from_r, on_broken=broken)
        sandbox = cls(spec, attempt, pid, link)
        owner.append(sandbox)
        try:
            await attempt.spawned(pid)
            async with asyncio.timeout(_READY_TIMEOUT_S):
                await link.ready()
        except BaseException as exc:
            sandbox.kill("spawn_failed")
            await asyncio.shield(sandbox.ended)
            if isinstance(exc, (LinkBroken, TimeoutError)):
                status = sandbox.ended.result()
                raise OSError(f"the sandbox's agent did not start ({status.reason})") from exc
            raise
        return sandbox

    # lifecycle

    def counters(self) -> GroupUsage | None:
        """Its cgroup's counters now; the last read before it ended, once it has; None where
        its tier has none to read."""
        if self._pidfd is None:
            return self.final_counters
        return self._attempt.counters() if isinstance(self._attempt, Meterable) else None

    async def pause(self) -> None:
        """Freeze every process of the sandbox in place; `Unsupported` where this tier or
        node cannot."""
        pausable = self._attempt
        if not isinstance(pausable, Pausable):
            raise Unsupported(f"the {self.spec.isolation} tier cannot pause a sandbox")
        try:
            await pausable.pause()
        except OSError as exc:
            raise Unsupported(str(exc)) from exc
        self._frozen = True

    async def resume(self) -> None:
        pausable = self._attempt
        if isinstance(pausable, Pausable):
            await pausable.resume()
        self._frozen = False

    @property
    def paused(self) -> bool:
        return self._frozen

    async def stop(self, grace_s: float = _STOP_GRACE_S) -> ExitStatus:
        """End the sandbox: its processes get SIGTERM, then SIGKILL after `grace_s`; it is
        killed whatever happens on the way."""
        if not self.ended.done():
            try:
                if self._frozen:
                    with contextlib.suppress(Exception):
                        await self.resume()
                with contextlib.suppress(LinkBroken):
                    for process in self.link.processes():
                        process.signal(signal.SIGTERM)
                with contextlib.suppress(TimeoutError, LinkBroken):
                    async with asyncio.timeout(grace_s):
                        await self._quiet()
            finally:
                self.kill("stopped")
        return await asyncio.shield(self.ended)

    async def _quiet(self) -> None:
        for process in self.link.processes():
            with contextlib.suppress(LinkBroken):
                await process.wait()

    def kill(self, reason: str) -> None:
        if self._kill_reason is None:
            self._kill_reason = reason
        self.link.close()
        if self._pidfd is not None:  # None once reaped: the number may be another file's
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
        self._attempt.kill()

    def _on_exit(self) -> None:
        try:
            pid, status, _ = os.wait4(self.pid, os.WNOHANG)
        except ChildProcessError:
            pid, status = self.pid, 255 << 8
        if pid == 0:
            return
        assert self._pidfd is not None
        self._loop.remove_reader(self._pidfd)
        os.close(self._pidfd)
        self._pidfd = None
        reaper.untrack(self.pid)
        self.link.close()
        if isinstance(self._attempt, Meterable):
            # Before the attempt is finished, which removes its cgroup: its last use.
            with contextlib.suppress(OSError):
                self.final_counters = self._attempt.counters()
        code = os.waitstatus_to_exitcode(status)
        reason = self._kill_reason
        if reason is None and code < 0:
            reason = exits.killed_by(-code)
        usage = Usage(wall_ms=(time.monotonic() - self._started) * 1000)
        exit_status = ExitStatus(code, reason, None, usage)

        def settled() -> None:
            try:
                final = self._attempt.finish(exit_status)
            except Exception:
                log.exception("cleaning up after sandbox %s", self.spec.id)
                final = exit_status
            if not self.ended.done():
                self.ended.set_result(final)

        try:
            self._attempt.exited(settled)
        except Exception:
            log.exception("after the end of sandbox %s", self.spec.id)
            settled()
