"""The `namespace` tier: the program runs under bubblewrap, in new user, PID, mount, network,
IPC, UTS and cgroup namespaces, on a read-only view of the host's programs (see `bwrap` for
the file system), with no capabilities, the sandbox layer's seccomp filter
(`treadle.shuttle.sandbox.seccomp`), and the function's memory, cpu and process limits
enforced by cgroups (`treadle.shuttle.sandbox.cgroups`), or by rlimits where this host offers no
cgroups to this process.

It reuses the process tier's machinery; only what is spawned differs (`NamespaceLauncher`).

Putting the sandbox in its cgroup before the program runs: v1 has no way to spawn straight
into a cgroup (v2's CLONE_INTO_CGROUP), and writing bubblewrap's pid into the cgroup right after
spawning races with bubblewrap creating the sandbox. So bubblewrap is asked to leave the
sandbox's user namespace to Shuttle (`--userns-block-fd`): it creates the sandbox's first
process, reports its pid (`--info-fd`) and holds it before anything happens in it. Shuttle
moves that process into the group, sets its rlimits and writes its namespace's id maps (the
identity bubblewrap itself would map: Shuttle's user and group, nothing else), then releases
it. All of the sandbox's own set-up (mounts, the work dir's files) is charged to the group
too, and one burst of cgroup migrations is all a start costs (the first migration after an
idle spell waits for an RCU grace period in the kernel: that, not bubblewrap, is the tail of
the start latency on v1). A Shuttle that dies during the handshake takes bubblewrap with it
(--die-with-parent), and the held sandbox stays held, having run nothing.

Killing: the sandbox's first process is PID 1 of its namespace, and when it dies the kernel
kills everything else in the namespace; nothing can leave it. Shuttle holds a pidfd of it and
SIGKILLs it whenever the attempt is killed or bubblewrap exits, and reports the exit once it is
gone, so the cgroup's counters are final and the group can be removed.

Exit codes: bubblewrap reports the program's death by signal N as exit code 128 + N, as shells
do; this tier reports such codes as that signal (exit code -N, reason "killed:SIGNAME"), so a
program that itself exits with 129-192 is reported as killed by the signal. The cgroup then
tells "oom_killed" (the memory limit) and "pids_limit" (a failure after pids.max refused a
fork) apart.

Network: an execution gets network only when its function asks for it (`AssignSpec.network`)
and the operator allows it (`allow_network`), and only where slirp4netns is installed and works
(`NamespaceRuntime.gives_network`; `probe()` tries it). Even then the sandbox keeps a network
namespace of its own, and the hand-off above gains a second step. slirp4netns brings the
namespace's loopback up as it configures its interface, and bubblewrap, finding the loopback's
address already there, would fail its own set-up; so Shuttle releases the sandbox from its
first wait, bubblewrap sets up the loopback and the file system and waits again (`--block-fd`,
on the same pipe), and meanwhile, once the loopback has its address, Shuttle attaches
slirp4netns and waits for its word that the network is configured; only then does it let the
program run. See `slirp` for what the sandbox can and cannot reach. slirp4netns ends with the
attempt, which reports its exit once slirp4netns is gone too. A failure of slirp4netns fails
the start ("spawn_failed") with its words. An execution that asks for network where this node
does not give it ends as "spawn_failed" too, saying `NO_NETWORK`: it never runs without the
network it asked for, and never with the host's.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import json
import logging
import os
import resource
import secrets
import shutil
import signal
import socket
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from treadle.domain.resources import Resources, Tier
from treadle.protocol.messages import AssignSpec, Usage
from treadle.shuttle import reaper
from treadle.shuttle.runtimes import bwrap, slirp
from treadle.shuttle.runtimes._spawn import identity_unsupported_reason, unsupported_reason
from treadle.shuttle.runtimes.base import ExitStatus, RuntimeHandle, SpawnFailed
from treadle.shuttle.runtimes.process import (
    RESULT_FD,
    Attempt,
    Launch,
    ProcessRuntime,
    ReadOnlyBind,
    environment,
    workdir_files,
)
from treadle.shuttle.sandbox import cleanup, exits, owners, seccomp
from treadle.shuttle.sandbox.cgroups import Cgroups, Group, GroupUsage, Limits, detect
from treadle.shuttle.sandbox.ids import SANDBOX_GID, SANDBOX_UID, IdPool, IdRange, pool_for
from treadle.shuttle.sandbox.policy import AGENT_USER_ENV, ROOT_CAPABILITIES
from treadle.shuttle.settings import ShuttleSettings

__all__ = [
    "NO_NETWORK",
    "NamespaceLauncher",
    "NamespaceRuntime",
    "NoNetwork",
    "Unavailable",
    "cgroup_owner",
    "wants_network",
]

log = logging.getLogger(__name__)

_MIB = 1024 * 1024
_START_TIMEOUT_S = 10.0
_PROBE_TIMEOUT_S = 10.0
# bubblewrap's own inputs sit right above the program's fds (0-2 and the result pipe).
_FIRST_FD = RESULT_FD + 1


NO_NETWORK = "this node does not give network to executions"


class Unavailable(Exception):
    """The namespace tier cannot run on this host; the message says why."""


class NoNetwork(OSError):
    """The execution asked for network, which this node does not give."""


class _NetworkFailed(OSError):
    """The sandbox's network could not be set up; the sandbox, killed before it ran anything,
    is gone once `ended` is done."""

    def __init__(self, message: str, ended: asyncio.Future[None]) -> None:
        super().__init__(message)
        self.ended = ended


def wants_network(spec: AssignSpec) -> bool:
    """Whether the function asked for network (which it gets only where the node gives it)."""
    return spec.network


@dataclass(frozen=True, slots=True)
class _Limits:
    cgroups: Cgroups | None
    pids_max: int

    def describe(self) -> str:
        if self.cgroups is None:
            return "rlimits"
        layout = self.cgroups.layout
        return f"cgroup v{layout.version} ({', '.join(sorted(layout.parents))})"


class NamespaceLauncher:
    """Spawns bubblewrap around each attempt's program (see the module's docstring)."""

    def __init__(
        self,
        bwrap_path: str,
        *,
        seccomp_program: bytes,
        cgroups: Cgroups | None,
        group_prefix: str,
        pids_max: int,
        allow_network: bool = False,
        ids: IdPool | None = None,
        weaver_addresses: Iterable[str] = (),
    ) -> None:
        # By its real path: a link in a directory of Shuttle's PATH is Shuttle's to change.
        self._bwrap = os.path.realpath(bwrap_path)
        self._ids = ids
        if ids is not None:
            reason = identity_unsupported_reason()
            if reason is None and not _limited_by_cgroups(cgroups) and not _may_limit_others():
                # Without cgroups, rlimits bound a sandbox, and setting those of a process of
                # another uid takes CAP_SYS_RESOURCE (which containers often drop).
                reason = "without cgroups for memory and pids, that needs CAP_SYS_RESOURCE"
            if reason is not None:
                raise Unavailable(f"cannot start sandboxes as their own users: {reason}")
            # No core dumps, for Shuttle and all it starts, for good: a crash of sandboxed
            # code must not feed a core to the host's handler.
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        self._seccomp = seccomp_program
        self._binds = bwrap.host_binds()
        self.limits = _Limits(cgroups, pids_max)
        self.group_prefix = group_prefix
        # What gives network to the sandboxes that ask for it; None where none is given.
        self.slirp = slirp.find(weaver_addresses) if allow_network else None

    @property
    def tier(self) -> Tier:
        return Tier.NAMESPACE

    @property
    def gives_network(self) -> bool:
        return self.slirp is not None

    @property
    def seccomp_program(self) -> bytes:
        """The filter every sandbox of this launcher runs under (a microVM's guest installs
        the same one)."""
        return self._seccomp

    def prepare(
        self,
        spec: AssignSpec,
        workdir: Path,
        *,
        binds: Sequence[ReadOnlyBind] = (),
        freezable: bool = False,
        users: bool = False,
        devices: Sequence[str] = (),
    ) -> Attempt:
        """See `Launcher.prepare`; `freezable`: the attempt's group can be frozen (a
        long-lived sandbox's pause), which on cgroup v1 costs one more hierarchy. `users`:
        the sandbox has users of its own (every id of its range mapped) and its program
        starts with `ROOT_CAPABILITIES`, told so by `AGENT_USER_ENV`, to act as any of them;
        granted only where the workload has host ids of its own (Shuttle is root). `devices`:
        host device nodes shown at their own paths (a microVM's VMM needs /dev/kvm)."""
        # `workdir` stays unused: the work dir lives inside the sandbox (see `bwrap`).
        files = workdir_files(spec)
        home = spec.workdir or bwrap.WORK_DIR
        env = environment(spec, home)
        users = users and self._ids is not None
        if users:
            env[AGENT_USER_ENV] = f"{SANDBOX_UID}:{SANDBOX_GID}"
        bwrap.resolve_in_sandbox(
            spec.argv[0],
            env.get("PATH", ""),
            {name: mode for name, _, mode in files},
            {bind.target: bind.source for bind in binds},
        )
        needed = sum(len(data) for _, data, _ in files) + _MIB
        disk_bytes = max(spec.resources.disk_mib * _MIB, needed)
        network = self.slirp if wants_network(spec) else None
        if wants_network(spec) and network is None:
            raise NoNetwork(NO_NETWORK)
        attempt = _NamespaceAttempt(self.limits, network, self._ids)
        attempt.all_ids = users
        try:
            if self._ids is not None:
                attempt.ids = self._ids.claim()
            child: dict[int, int] = {}  # bubblewrap's fd -> ours

            def give(fd: int) -> int:
                number = _FIRST_FD + len(child)
                child[number] = fd
                attempt.child_ends.append(fd)
                return number

            seccomp_fd = give(_pipe_with(self._seccomp))
            attempt.info, info_w = os.pipe()
            info_fd = give(info_w)
            block_r, attempt.block = os.pipe()
            block_fd = give(block_r)
            resolv_fd = None
            if network is not None:
                resolv_fd = give(_memfd("resolv.conf", slirp.RESOLV_CONF))
            file_fds = [(give(_memfd(name, data)), name, mode) for name, data, mode in files]
            etc_fds = [(give(_memfd(name, data)), name) for name, data in bwrap.sandbox_etc()]
            fds = bwrap.Fds(
                seccomp=seccomp_fd,
                info=info_fd,
                block=block_fd,
                files=file_fds,
                resolv_conf=resolv_fd,
                etc=etc_fds,
            )
            args = bwrap.options(
                binds=[
                    *self._binds,
                    *bwrap.read_only_binds((bind.source, bind.target) for bind in binds),
                    *(arg for device in devices for arg in ("--dev-bind", device, device)),
                ],
                fds=fds,
                env=env,
                disk_bytes=disk_bytes,
                network=network is not None,
                capabilities=ROOT_CAPABILITIES if users else (),
                home=home,
            )
            args_fd = give(_memfd("bwrap-args", b"\0".join(a.encode() for a in args) + b"\0"))
            if self.limits.cgroups is not None:
                name = f"{self.group_prefix}{secrets.token_hex(6)}"
                attempt.group = self.limits.cgroups.create(
                    name,
                    Limits.for_resources(spec.resources, self.limits.pids_max),
                    freezable=freezable,
                )
            attempt.resources = spec.resources
        except BaseException:
            attempt.abandon()
            raise
        argv = [self._bwrap, "--args", str(args_fd), "--", *spec.argv]
        attempt.launch = Launch(
            program=argv[0],
            argv=argv,
            env={},  # bubblewrap's own: the program's goes through --setenv
            cwd=Path("/"),
            fds=child,
            # bubblewrap itself, and so the sandbox, starts as the workload's unprivileged
            # host ids: a user namespace maps ids, it does not change who a process is.
            ids=None
            if attempt.ids is None
            else (attempt.ids.host(SANDBOX_UID), attempt.ids.host(SANDBOX_GID)),
        )
        return attempt


class _NamespaceAttempt:
    """One sandbox: the fds of bubblewrap's handshake, the cgroup, a pidfd of the sandbox's
    PID 1 once known, and its network (slirp4netns) where it has one."""

    launch: Launch

    def __init__(
        self, limits: _Limits, network: slirp.Slirp | None = None, pool: IdPool | None = None
    ) -> None:
        self._limits = limits
        self._network = network
        self._pool = pool
        self.ids: IdRange | None = None  # the workload's host ids, where it has its own
        self.all_ids = False  # map all of `ids`, not only the sandbox's user
        self.link: slirp.Link | None = None
        self.resources = Resources()
        self.child_ends: list[int] = []  # bubblewrap's ends, closed here once it has them
        self.info: int | None = None
        self.block: int | None = None
        self.group: Group | None = None
        self._sandbox: int | None = None  # pidfd of the sandbox's PID 1
        self._pid: int | None = None  # and its pid
        self._net: tuple[int, int] | None = None  # its network's bytes in and out, last read
        self._killed = False
        self._ended: asyncio.Future[None] | None = None  # done once all is released

    async def spawned(self, pid: int) -> None:
        self._ended = asyncio.get_running_loop().create_future()
        self._close_child_ends()
        assert self.info is not None and self.block is not None
        try:
            sandbox = await _sandbox_pid(self.info)
            if sandbox is not None:
                # Off the event loop: moving a process between v1 cgroups can wait for an
                # RCU grace period (milliseconds), and other attempts' output must not.
                await asyncio.to_thread(self._hold, sandbox)
                await self._connect(sandbox)
        except BaseException:
            self.kill()
            raise
        finally:
            _close(self.info)
            self.info = None
        if self._killed:
            self.kill()  # killed while starting, before the sandbox was known
        else:
            # From here on the sandbox runs: a byte, or the end of the pipe, ends its last
            # wait (see `_connect` for the wait before).
            with contextlib.suppress(BrokenPipeError):
                os.write(self.block, b"x")
        _close(self.block)
        self.block = None

    async def _connect(self, pid: int) -> None:
        """Give the held sandbox its network, if it is to have one (the second step of the
        hand-off, see the module's docstring); returns once the network is up. The pipe of
        `block` stays open: its first byte lets bubblewrap go on, and the sandbox, once set
        up, waits for a second."""
        if self._network is None or self._sandbox is None or self._killed:
            return
        assert self._ended is not None and self.block is not None
        with contextlib.suppress(BrokenPipeError):
            os.write(self.block, b"x")
        try:
            if not await asyncio.to_thread(_loopback_set_up, pid):
                return  # gone: bubblewrap failed, and reports why
            if self._killed:
                return
            await self._network.fence(pid, self._sandbox)
            if self._killed:
                return
            self.link = self._network.attach(pid, self._sandbox)
            await self.link.ready()
        except (ProcessLookupError, FileNotFoundError):
            return  # gone: bubblewrap failed, and reports why
        except slirp.SlirpFailed as exc:
            if self._killed:
                return  # stopped along with the attempt, whose kill says why
            raise _NetworkFailed(str(exc), self._ended) from exc

    async def pause(self) -> None:
        """Freeze every process of the sandbox in place (its cgroup's freezer)."""
        if self.group is None:
            raise OSError(errno.ENOTSUP, "this host gives the sandbox no cgroup to freeze")
        await asyncio.to_thread(self.group.freeze_and_wait)

    async def resume(self) -> None:
        if self.group is not None:
            await asyncio.to_thread(self.group.thaw)

    def _hold(self, pid: int) -> None:
        """Take charge of the sandbox's first process, held by bubblewrap."""
        try:
            self._sandbox = os.pidfd_open(pid)
        except ProcessLookupError:
            return  # bubblewrap failed and took it down already
        self._pid = pid
        try:
            if self.group is not None:
                self.group.place(pid)
            self._set_rlimits(pid)
            if self.ids is not None:
                uid, gid = self.ids.host(SANDBOX_UID), self.ids.host(SANDBOX_GID)
            else:
                uid, gid = os.getuid(), os.getgid()
            if self.all_ids and self.ids is not None:
                uid_map = gid_map = f"0 {self.ids.start} {self.ids.size}\n"
            else:
                uid_map, gid_map = f"{SANDBOX_UID} {uid} 1\n", f"{SANDBOX_GID} {gid} 1\n"
            _write_proc(pid, "uid_map", uid_map)
            _write_proc(pid, "setgroups", "deny")  # what lets an unprivileged user map gids
            _write_proc(pid, "gid_map", gid_map)
        except (ProcessLookupError, FileNotFoundError):
            pass  # gone: bubblewrap failed, and reports why

    def _set_rlimits(self, pid: int) -> None:
        limits = []
        if self.ids is None:
            # A crash of sandboxed code must not feed a core dump to the host's handler.
            # (With ids of its own, it inherits Shuttle's hard 0: see `NamespaceLauncher`.)
            limits.append((resource.RLIMIT_CORE, 0))
        cgroups = self._limits.cgroups if self.group is not None else None
        if cgroups is None or not cgroups.layout.has("memory"):
            limits.append((resource.RLIMIT_AS, self.resources.memory_mib * _MIB))
        if cgroups is None or not cgroups.layout.has("pids"):
            # Counts every process of the sandbox's host uid: the workload's own where
            # Shuttle is root, Shuttle's (and its other sandboxes') otherwise.
            limits.append((resource.RLIMIT_NPROC, self._limits.pids_max))
        for which, limit in limits:
            resource.prlimit(pid, which, (limit, limit))

    def kill(self) -> None:
        self._killed = True
        if self._sandbox is not None and self._network is not None:
            self._read_net()  # the last chance: its network ends with it
        if self._sandbox is not None:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._sandbox, signal.SIGKILL)
        if self.link is not None:
            self.link.stop()

    def exited(self, settled: Callable[[], None]) -> None:
        self.kill()
        # Settled once both the sandbox and its slirp4netns are gone, so that nothing of the
        # attempt outlives the report of its exit.
        waiting = 2

        def one_gone() -> None:
            nonlocal waiting
            waiting -= 1
            if waiting == 0:
                settled()

        if self.link is None:
            one_gone()
        else:
            self.link.when_ended(one_gone)
        pidfd = self._sandbox
        if pidfd is None:
            one_gone()
            return
        loop = asyncio.get_running_loop()

        def gone() -> None:
            loop.remove_reader(pidfd)
            one_gone()

        # A pidfd turns readable once its process has ended; PID 1 of a namespace ends last.
        loop.add_reader(pidfd, gone)

    def counters(self) -> GroupUsage | None:
        """Its cgroup's counters now (None without one), and its network's."""
        if self.group is None:
            return None
        return self.group.usage().with_net(self._read_net())

    def _read_net(self) -> tuple[int, int] | None:
        """Bytes in and out on its network's interfaces, from its network namespace (the
        last read once its PID 1 is gone); None without a network of its own."""
        if self._network is None or self._pid is None:
            return None
        with contextlib.suppress(OSError, ValueError):
            net = slirp.interface_bytes(Path(f"/proc/{self._pid}/net/dev").read_text())
            # The pid is checked after the read: a pid reused by another process fails it.
            if self._sandbox is not None:
                signal.pidfd_send_signal(self._sandbox, 0)
                self._net = net
        return self._net

    def finish(self, status: ExitStatus) -> ExitStatus:
        self._release_fds()
        self._release_ids()
        if self._ended is not None and not self._ended.done():
            self._ended.set_result(None)
        if self.group is None:
            return _classify(status, None)
        usage = self.group.usage().with_net(self._net)
        self._remove_group()
        return _classify(status, usage)

    def abandon(self) -> None:
        self._release_fds()
        self._release_ids()
        self._remove_group()

    def _release_ids(self) -> None:
        # The sandbox's PID 1 is gone, and with it every process of its PID namespace: no
        # process holds these ids any more.
        ids, self.ids = self.ids, None
        if ids is not None and self._pool is not None:
            self._pool.give_back(ids)

    def _remove_group(self) -> None:
        # After the exit report: the sandbox's PID 1 is gone, so nothing of it runs, but v1
        # can keep the group busy for a moment, and the retries must not delay anyone.
        group, self.group = self.group, None
        if group is not None:
            cleanup.defer(lambda: _destroy(group), group.name)

    def _close_child_ends(self) -> None:
        for fd in self.child_ends:
            _close(fd)
        self.child_ends.clear()

    def _release_fds(self) -> None:
        self._close_child_ends()
        if self.link is not None:
            self.link.close()
            self.link = None
        for fd in (self.info, self.block, self._sandbox):
            _close(fd)
        self.info = self.block = self._sandbox = None


def _destroy(group: Group) -> None:
    errors = group.destroy()
    if errors:
        log.warning("cgroup %s stays; the next Shuttle start sweeps it: %s", group.name, errors)


def _classify(status: ExitStatus, usage: GroupUsage | None) -> ExitStatus:
    code, reason = exits.classify(
        status.exit_code,
        status.reason,
        oom_killed=usage is not None and bool(usage.oom_kills),
        pids_denied=usage is not None and bool(usage.pids_denied),
    )
    return ExitStatus(
        exit_code=code,
        reason=reason,
        result=status.result,
        counters=usage,
        usage=Usage(
            wall_ms=status.usage.wall_ms,
            # bubblewrap's own rusage says nothing of the sandbox: only the cgroup knows.
            cpu_ms=None if usage is None or usage.cpu_ns is None else usage.cpu_ns / 1e6,
            max_rss_kib=None
            if usage is None or usage.peak_bytes is None
            else usage.peak_bytes // 1024,
        ),
    )


async def _sandbox_pid(info: int) -> int | None:
    """The host pid of the sandbox's first process, from bubblewrap's --info-fd; None when
    bubblewrap ended before creating it."""
    loop = asyncio.get_running_loop()
    data = bytearray()
    done: asyncio.Future[None] = loop.create_future()

    def readable() -> None:
        try:
            chunk = os.read(info, 4096)
        except BlockingIOError:
            return
        if chunk:
            data.extend(chunk)
        elif not done.done():
            done.set_result(None)

    os.set_blocking(info, False)
    loop.add_reader(info, readable)
    try:
        async with asyncio.timeout(_START_TIMEOUT_S):
            await done
    except TimeoutError:
        raise OSError(
            f"bubblewrap did not start a sandbox within {_START_TIMEOUT_S:.0f}s"
        ) from None
    finally:
        loop.remove_reader(info)
    if not data:
        return None
    try:
        pid = json.loads(data)["child-pid"]
    except (ValueError, KeyError, TypeError) as exc:
        raise OSError(f"bubblewrap reported {bytes(data)!r}") from exc
    return int(pid)


def _loopback_set_up(pid: int) -> bool:
    """Wait until the network namespace of `pid` has an address: bubblewrap gives the
    loopback 127.0.0.1 first thing once released, and says nothing when, but the routing
    table shows it. False when the process is gone."""
    deadline = time.monotonic() + _START_TIMEOUT_S
    pause = 50e-6
    while True:
        try:
            with open(f"/proc/{pid}/net/fib_trie", "rb") as table:
                if table.read(1):
                    return True
        except (FileNotFoundError, ProcessLookupError):
            return False
        if time.monotonic() > deadline:
            raise OSError(f"bubblewrap did not set up a loopback within {_START_TIMEOUT_S:.0f}s")
        time.sleep(pause)
        pause = min(pause * 2, 0.01)


def _write_proc(pid: int, name: str, value: str) -> None:
    fd = os.open(f"/proc/{pid}/{name}", os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _pipe_with(data: bytes) -> int:
    """A pipe's read end holding `data` (which must fit the pipe's buffer)."""
    r, w = os.pipe()
    try:
        os.write(w, data)
    except BaseException:
        os.close(r)
        raise
    finally:
        os.close(w)
    return r


def _memfd(name: str, data: bytes) -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _close(fd: int | None) -> None:
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)


class NamespaceRuntime(ProcessRuntime):
    """The namespace tier. Creating one sweeps the cgroups that a previous Shuttle with the
    same home left behind. Raises Unavailable where the tier cannot work at all; `probe()`
    tells whether it really does."""

    def __init__(self, settings: ShuttleSettings, *, drain_timeout_s: float = 1.0) -> None:
        reason = unsupported_reason()
        if reason is not None:
            raise Unavailable(reason)
        bwrap_path = shutil.which("bwrap")
        if bwrap_path is None:
            raise Unavailable("bubblewrap (bwrap) is not installed")
        arch = seccomp.arch_for_machine()
        if arch is None:
            raise Unavailable("no seccomp table for this machine's architecture")
        prefix, stale = _group_names(settings.home)
        self._namespace = NamespaceLauncher(
            bwrap_path,
            seccomp_program=seccomp.deny_filter(arch),
            cgroups=_open_cgroups(stale),
            group_prefix=prefix,
            pids_max=settings.pids_max,
            allow_network=settings.allow_network,
            ids=pool_for(settings.sandbox_ids_base),
            weaver_addresses=_addresses(settings) if settings.allow_network else (),
        )
        super().__init__(self._namespace, drain_timeout_s=drain_timeout_s)

    @property
    def limits(self) -> str:
        """How resource limits are enforced: "cgroup v1 (…)", "cgroup v2 (…)" or "rlimits"."""
        return self._namespace.limits.describe()

    @property
    def cgroups(self) -> Cgroups | None:
        return self._namespace.limits.cgroups

    @property
    def group_prefix(self) -> str:
        """What starts the names of the cgroups of this runtime's attempts."""
        return self._namespace.group_prefix

    @property
    def gives_network(self) -> bool:
        """Whether an execution whose function asks for network gets it here: the operator
        allows it and slirp4netns is installed (and, once `probe()` ran, works)."""
        return self._namespace.gives_network

    async def start(self, spec: AssignSpec, workdir: Path) -> RuntimeHandle:
        if wants_network(spec) and not self.gives_network:
            return SpawnFailed(f"treadle: {NO_NETWORK}\n")
        return await _start(self, spec, workdir)

    def probe(self) -> str | None:
        """Run /bin/true in a sandbox exactly as an execution would run; None if that worked,
        else why not. Where network is allowed, a second trial with network decides whether
        this runtime gives it (`gives_network`)."""
        # The caller may be inside an event loop: run the trial on a loop of its own.
        with ThreadPoolExecutor(1, thread_name_prefix="treadle-probe") as pool:
            return pool.submit(asyncio.run, self._probe()).result()

    async def _probe(self) -> str | None:
        reason = await self._trial(network=False)
        if reason is None:
            await self._probe_network()
        return reason

    async def _probe_network(self) -> None:
        launcher = self._namespace
        first = launcher.slirp
        failed: list[str] = []
        while launcher.slirp is not None:
            reason = await self._trial(network=True)
            if reason is None:
                if failed:
                    log.warning(
                        "namespace runtime: network through %s, as %s",
                        launcher.slirp.describe(),
                        failed[0],
                    )
                return
            failed.append(reason)
            launcher.slirp = launcher.slirp.weaker()
        if first is not None:
            log.warning("namespace runtime: no network for executions: %s", failed[0])

    async def _trial(self, *, network: bool) -> str | None:
        trial = ProcessRuntime(self._namespace)
        spec = AssignSpec(
            id="probe",
            attempt=1,
            tenant_id="-",
            function="probe",
            version=1,
            argv=["/bin/true"],
            timeout_s=_PROBE_TIMEOUT_S,
            resources=Resources(),
            isolation=Tier.NAMESPACE,
            network=network,
        )
        try:
            handle = await _start(trial, spec, Path("/nonexistent"))
            output = b"".join([data async for _, data in handle.output()])
            status = await handle.wait()
        except OSError as exc:
            return f"a trial run failed to start: {exc}"
        finally:
            reaper.reap_orphans()
        if status.exit_code == 0 and status.reason is None:
            return None
        said = output.decode(errors="replace").strip() or "no output"
        run = "a trial run of /bin/true" + (" with network" if network else "")
        return f"{run} ended with {status.exit_code} ({status.reason}): {said}"


def _limited_by_cgroups(cgroups: Cgroups | None) -> bool:
    return cgroups is not None and all(cgroups.layout.has(c) for c in ("memory", "pids"))


def _may_limit_others() -> bool:
    """Whether this process has CAP_SYS_RESOURCE (capability 24) in effect."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> 24 & 1)
    return False


async def _start(runtime: ProcessRuntime, spec: AssignSpec, workdir: Path) -> RuntimeHandle:
    """`runtime.start` of the process tier, where a sandbox that could not get its network
    ends as a program that could not start, with the reason, once nothing of it is left."""
    try:
        return await ProcessRuntime.start(runtime, spec, workdir)
    except _NetworkFailed as exc:
        log.warning("%s attempt %d: %s", spec.id, spec.attempt, exc)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_START_TIMEOUT_S):
                await exc.ended
        return SpawnFailed(f"treadle: {exc}\n")


def _addresses(settings: ShuttleSettings) -> list[str]:
    """Weaver's IPv4 addresses, as this node resolves them now."""
    found: set[str] = set()
    for url in settings.agent_urls:
        host = urlsplit(url).hostname
        if host is None:
            continue
        with contextlib.suppress(OSError):
            for *_, address in socket.getaddrinfo(host, None, socket.AF_INET):
                found.add(str(address[0]))
    return sorted(found)


def cgroup_owner(home: Path) -> str:
    """What starts the cgroup names of the Shuttle with this home:
    `<owner>.<token>.<random>` (`treadle.shuttle.sandbox.owners`)."""
    return hashlib.sha256(os.fsencode(home.absolute())).hexdigest()[:12]


def _group_names(home: Path) -> tuple[str, Callable[[str], bool]]:
    """The prefix of this process's cgroup names, and which names were left by a Shuttle
    with the same home that is gone. (A runtime is created before Shuttle takes the lock on
    its home, so a second Shuttle on a home in use must not take the first one's groups for
    leftovers: those of a live process are not.)"""
    owner = cgroup_owner(home)

    def stale(name: str) -> bool:
        name_owner, _, rest = name.partition(".")
        token, _, _ = rest.partition(".")
        return name_owner == owner and owners.is_gone(token)

    try:
        token = owners.token()
    except OSError as exc:
        raise Unavailable(f"cannot keep this node's state: {exc}") from exc
    return f"{owner}.{token}.", stale


def _open_cgroups(stale: Callable[[str], bool]) -> Cgroups | None:
    layout, found = detect()
    if layout is None:
        log.info("namespace runtime: %s; limits through rlimits", found)
        return None
    try:
        cgroups = Cgroups(layout)
    except OSError as exc:
        log.warning("namespace runtime: cannot use %s (%s); limits through rlimits", found, exc)
        return None
    stuck = cgroups.sweep(stale)
    if stuck:
        log.warning("cgroups left by a previous Shuttle stay busy: %s", ", ".join(stuck))
    log.info("namespace runtime: limits through %s", found)
    return cgroups
