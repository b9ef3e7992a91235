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
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Protocol, runtime_checkable

from treadle.domain.resources import Resources, Tier
from treadle.domain.sandbox import boundary_resources
from treadle.guest.sudo import SOCKET_NAME
from treadle.guest.vmboot import WAITING
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
        self.booted_at = self._started  # monotonic: when its boundary started
        self._kill_reason: str | None = None
        self._frozen = False
        self._baseline: GroupUsage | None = None  # counted before it was handed over
        self.final_counters: GroupUsage | None = None
        self.ended: asyncio.Future[ExitStatus] = self._loop.create_future()
        self._loop.add_reader(pidfd, self._on_exit)

    @classmethod
    async def start(cls, launcher: Launcher, spec: SandboxSpec, workdir: Path) -> LiveSandbox:
        """Start the sandbox and wait for its agent's word; raises OSError or ValueError
        when it cannot start (the reason in the message). Where the launcher keeps VMs
        booted ahead (`MicrovmLauncher.pool`), one of the sandbox's shape is taken and
        handed the sandbox's settings instead."""
        assign, binds = await _agent_spec(launcher, spec)
        await _fetch_image(launcher, assign)  # the shape's image, known before a VM is taken
        if isinstance(launcher, MicrovmLauncher) and launcher.pool is not None:
            # Made before a VM is taken: settings that cannot be sent leave the pool as it was.
            settings = launcher.settings(assign, users=True)
            warm = launcher.pool.take(assign, binds)
            if warm is not None:
                warm.spec = spec
                try:
                    await warm.hand_over(settings)
                    return warm
                except OSError as exc:  # it ended as it was taken: boot one as if none waited
                    log.warning("sandbox %s: the warm VM taken failed (%s)", spec.id, exc)
        sandbox = await cls.boot(launcher, spec, assign, binds, workdir)
        await sandbox._until(sandbox.link.ready(), "the sandbox's agent did not start")
        return sandbox

    @classmethod
    async def boot(
        cls,
        launcher: Launcher,
        spec: SandboxSpec,
        assign: AssignSpec,
        binds: Sequence[ReadOnlyBind],
        workdir: Path,
        *,
        waiting: bool = False,
    ) -> LiveSandbox:
        """Start the boundary with the agent as its program (`assign`, `binds`: from
        `agent_spec`), not waiting for the agent. `waiting` (microvm only): the VM boots
        without the workload's settings and waits for them (`hand_over`); returns once it
        says it waits."""
        await _fetch_image(launcher, assign)
        # Where the tier can, the sandbox has users of its own (`users`): its agent acts
        # as any of them (`treadle.guest.agent`).
        if isinstance(launcher, NamespaceLauncher):
            attempt: Attempt = launcher.prepare(
                assign, workdir, binds=binds, freezable=True, users=True
            )
        elif isinstance(launcher, MicrovmLauncher):
            # Its scratch disk is made off the event loop first (`mkfs`).
            scratch = await launcher.scratch_disk(assign)
            attempt = launcher.prepare(
                assign, workdir, binds=binds, users=True, waiting=waiting, scratch=scratch
            )
        elif isinstance(launcher, OciLauncher):
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

        link = GuestLink(to_w, from_r, on_broken=broken, preamble=WAITING if waiting else b"")
        sandbox = cls(spec, attempt, pid, link)
        owner.append(sandbox)
        await sandbox._until(attempt.spawned(pid), "the sandbox did not start")
        await sandbox._until(link.booted(), "the VM did not boot")
        return sandbox

    async def hand_over(self, settings: bytes) -> None:
        """Give a VM booted `waiting` its workload's settings, and wait for its agent. What
        its cgroup counted so far (the boot) is nobody's: the sandbox's counters start
        here."""

        async def handed() -> None:
            if isinstance(self._attempt, Meterable):
                self._baseline = self._attempt.counters()
            self._started = time.monotonic()
            self.link.preface(settings)
            await self.link.ready()

        # As any start: the VM is the caller's now, and ended where a step fails.
        await self._until(handed(), "the warm VM did not take its workload")

    async def _until(self, step: Awaitable[object], failure: str) -> None:
        """Wait for a step of its start; the sandbox is ended where the step fails."""
        try:
            async with asyncio.timeout(_READY_TIMEOUT_S):
                await step
        except BaseException as exc:
            self.kill("spawn_failed")
            await asyncio.shield(self.ended)
            if isinstance(exc, (LinkBroken, TimeoutError)):
                status = self.ended.result()
                raise OSError(f"{failure} ({status.reason})") from exc
            raise

    # lifecycle

    @property
    def counted_before(self) -> GroupUsage | None:
        """What its cgroup counted before it was handed over (a warm VM's boot), which its
        counters leave out; None where it booted for this sandbox."""
        return self._baseline

    def counters(self) -> GroupUsage | None:
        """Its cgroup's counters now; the last read before it ended, once it has; None where
        its tier has none to read."""
        if self._pidfd is None:
            return self.final_counters
        if not isinstance(self._attempt, Meterable):
            return None
        return _since(self._attempt.counters(), self._baseline)

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
                self.final_counters = _since(self._attempt.counters(), self._baseline)
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


async def _agent_spec(
    launcher: Launcher, spec: SandboxSpec
) -> tuple[AssignSpec, tuple[ReadOnlyBind, ...]]:
    """The sandbox as an attempt of `launcher`'s tier whose program is the agent, and what
    it needs bound (the agent's runtime)."""
    runtime = await agent_runtime.ensure_async()
    if launcher.tier is Tier.PROCESS:
        return spec.assign_spec(runtime.argv(str(runtime.path))), ()
    binds = (ReadOnlyBind(runtime.path, agent_runtime.MOUNT_POINT),)
    assign = spec.assign_spec(runtime.argv(agent_runtime.MOUNT_POINT), tools=agent_runtime.TOOLS)
    return assign, binds


async def _fetch_image(launcher: Launcher, assign: AssignSpec) -> None:
    if assign.image is not None:
        if not isinstance(launcher, ImageLauncher):
            raise ValueError(f"the {launcher.tier} tier cannot run an image")
        await launcher.fetch_image(assign)  # once per image and node: cached after


def _since(now: GroupUsage | None, baseline: GroupUsage | None) -> GroupUsage | None:
    return now if now is None or baseline is None else now.since(baseline)
