"""The `process` tier: a plain subprocess in a session of its own.

It isolates nothing (the code runs as Shuttle's user, on Shuttle's filesystem), so it exists
for development and tests only and Shuttle refuses it unless the operator opts in.

Everything here is driven by the event loop without threads or polling: the pipes and a
pidfd of the child are registered with the loop, so an execution costs a handful of file
descriptors and callbacks and nothing while it runs.

The same machinery (pipes, stdin, the result pipe, output backpressure, exit watching,
timeout, group kill) runs the tiers that wrap the program in a tool, such as bubblewrap: a
`Launcher` decides what to spawn for an attempt and gets hooks into the attempt's life
(`Attempt`). The process tier's launcher, `HostLauncher`, runs the program itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import posixpath
import shutil
import signal
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from treadle.domain.resources import Tier
from treadle.protocol.limits import MAX_JSON_DEPTH
from treadle.protocol.messages import AssignSpec, Usage
from treadle.shuttle import reaper
from treadle.shuttle.runtimes._spawn import resolve_program, spawn_async
from treadle.shuttle.runtimes.base import ExitStatus, RuntimeHandle, SpawnFailed, Stream
from treadle.shuttle.sandbox import exits
from treadle.shuttle.sandbox.cgroups import GroupUsage
from treadle.shuttle.sandbox.policy import ARGS_FILE, PATH, RESULT_FD

__all__ = [
    "ARGS_FILE",
    "RESULT_FD",
    "RESULT_LINE_LIMIT",
    "Attempt",
    "HostLauncher",
    "Launch",
    "Launcher",
    "ProcessHandle",
    "ProcessRuntime",
    "ReadOnlyBind",
    "ResultLines",
    "describe",
    "environment",
    "workdir_files",
]

log = logging.getLogger(__name__)

_READ_SIZE = 64 * 1024
RESULT_LINE_LIMIT = 1024 * 1024
# Output read but not yet taken by the consumer: above HIGH the pipes are no longer read
# (the program blocks on write), below LOW reading resumes.
_BUFFER_HIGH = 256 * 1024
_BUFFER_LOW = 64 * 1024
# After the program exited and its group was killed, only a process that escaped the group
# can still hold the pipes open; do not let it delay the exit report for longer than this.
_DRAIN_TIMEOUT_S = 1.0
# Orphans die a moment after the leader we reap; sweep for their zombies shortly after.
_SWEEP_DELAY_S = 0.1


@dataclass(frozen=True, slots=True)
class Launch:
    """What to spawn for one attempt. `fds` maps child fds above RESULT_FD to parent fds;
    those stay open in the parent, the attempt's to close. `result`: the result channel's
    (read end, end to give the child as RESULT_FD), where the launcher has its own (a FIFO
    that a sandbox opens by name); the handle takes both over. By default it is a pipe."""

    program: str
    argv: Sequence[str]
    env: Mapping[str, str]
    cwd: Path
    fds: Mapping[int, int] = field(default_factory=dict)
    result: tuple[int, int] | None = None
    # (uid, gid) to start as, where not Shuttle's own: a sandbox's host ids
    ids: tuple[int, int] | None = None


@dataclass(frozen=True, slots=True)
class ReadOnlyBind:
    """A host directory that a sandbox sees, read-only, at `target`: a path of the sandbox's
    that nothing else there uses (its parents are made where missing). Only the directory's
    own files are shown, none of its mounts or what lies around it on the host. A sandbox's
    guest agent gets its Python runtime this way (`treadle.shuttle.live.agent_runtime`)."""

    source: Path
    target: str

    def __post_init__(self) -> None:
        target = self.target
        if (
            not target.startswith("/")
            or posixpath.normpath(target) != target
            or target == "/"
            or "\0" in target
        ):
            raise ValueError(f"invalid mount point {target!r}")


class Attempt(Protocol):
    """A launcher's side of one attempt. The runtime and the handle call, in this order:
    `spawned` once the process runs (or `abandon` when it could not be spawned), `kill`
    whenever the attempt is killed, `exited` once the spawned process has been reaped, and
    `finish` last."""

    @property
    def launch(self) -> Launch: ...

    async def spawned(self, pid: int) -> None:
        """Runs before `start` returns; raising fails the start (the handle is killed)."""
        ...

    def kill(self) -> None:
        """Kill what the attempt runs beyond the spawned process group."""
        ...

    def exited(self, settled: Callable[[], None]) -> None:
        """The spawned process is gone: kill what is left and call `settled` once that has
        ended too."""
        ...

    def finish(self, status: ExitStatus) -> ExitStatus:
        """Release all the attempt holds; may refine the exit status (reason, usage)."""
        ...

    def abandon(self) -> None:
        """Nothing was spawned: release all the attempt holds."""
        ...


class Launcher(Protocol):
    @property
    def tier(self) -> Tier: ...

    def prepare(
        self, spec: AssignSpec, workdir: Path, *, binds: Sequence[ReadOnlyBind] = ()
    ) -> Attempt:
        """Get `spec` ready to spawn, with `binds` shown inside its sandbox. Raises OSError
        or ValueError when it cannot run (a tier that mounts nothing refuses any `binds`);
        the start then ends as "spawn_failed" with the error as the reason."""
        ...


@runtime_checkable
class ImageLauncher(Launcher, Protocol):
    """A launcher that can run a function's image."""

    async def fetch_image(self, spec: AssignSpec) -> None:
        """Make `spec.image` ready for `prepare` (pull and unpack it, or find it cached).
        Raises ValueError naming the image and the cause when it cannot."""
        ...


class HostLauncher:
    """The process tier's launcher: the program itself runs on the host, in `workdir`."""

    @property
    def tier(self) -> Tier:
        return Tier.PROCESS

    def prepare(
        self, spec: AssignSpec, workdir: Path, *, binds: Sequence[ReadOnlyBind] = ()
    ) -> Attempt:
        if binds:
            # Its programs see the host's file system as it is: a host directory is only
            # ever at its own path.
            raise ValueError("the process tier cannot mount anything")
        try:
            _prepare_workdir(spec, workdir)
            env = environment(spec, str(workdir))
            program = resolve_program(spec.argv[0], env.get("PATH", ""), workdir)
        except BaseException:
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        return _HostAttempt(Launch(program, spec.argv, env, workdir), workdir)


class _HostAttempt:
    __slots__ = ("_workdir", "launch")

    def __init__(self, launch: Launch, workdir: Path) -> None:
        self.launch = launch
        self._workdir = workdir

    async def spawned(self, pid: int) -> None:
        pass

    def kill(self) -> None:
        pass

    def exited(self, settled: Callable[[], None]) -> None:
        settled()

    def finish(self, status: ExitStatus) -> ExitStatus:
        shutil.rmtree(self._workdir, ignore_errors=True)
        return status

    def abandon(self) -> None:
        shutil.rmtree(self._workdir, ignore_errors=True)


class ProcessRuntime:
    """Runs an AssignSpec as a child process, spawned as `launcher` says (by default the
    program itself: the process tier). Creating one makes this process a child subreaper
    (see `treadle.shuttle.reaper`)."""

    def __init__(
        self, launcher: Launcher | None = None, *, drain_timeout_s: float = _DRAIN_TIMEOUT_S
    ) -> None:
        self._launcher: Launcher = launcher if launcher is not None else HostLauncher()
        self._drain_timeout_s = drain_timeout_s
        self._sweep: asyncio.TimerHandle | None = None
        reaper.become_subreaper()

    @property
    def tier(self) -> Tier:
        return self._launcher.tier

    @property
    def launcher(self) -> Launcher:
        """What prepares this tier's boundary (long-lived sandboxes use it too)."""
        return self._launcher

    async def start(self, spec: AssignSpec, workdir: Path) -> RuntimeHandle:
        if spec.image is not None:
            failed = await self._fetch_image(spec)
            if failed is not None:
                return failed
        started = await self._spawn(spec, workdir)
        if isinstance(started, SpawnFailed):
            return started
        handle, attempt = started
        try:
            await attempt.spawned(handle.pid)
        except BaseException:
            handle.kill()  # the handle cleans up after itself once the kill took effect
            raise
        return handle

    async def _fetch_image(self, spec: AssignSpec) -> SpawnFailed | None:
        if not isinstance(self._launcher, ImageLauncher):
            return SpawnFailed(f"treadle: the {self.tier} tier cannot run an image\n")
        try:
            await self._launcher.fetch_image(spec)
        except (OSError, ValueError) as exc:
            return SpawnFailed(f"treadle: cannot run {spec.argv[0]!r}: {describe(exc)}\n")
        return None

    async def _spawn(
        self, spec: AssignSpec, workdir: Path
    ) -> tuple[ProcessHandle, Attempt] | SpawnFailed:
        attempt = self._prepare(spec, workdir)
        if isinstance(attempt, SpawnFailed):
            return attempt
        try:
            handle = await ProcessHandle.spawn(
                asyncio.get_running_loop(),
                attempt=attempt,
                stdin=spec.stdin,
                timeout_s=spec.timeout_s,
                drain_timeout_s=self._drain_timeout_s,
                on_exit=self._schedule_sweep,
            )
        except (OSError, ValueError) as exc:
            attempt.abandon()
            return SpawnFailed(f"treadle: cannot run {spec.argv[0]!r}: {describe(exc)}\n")
        except BaseException:
            attempt.abandon()
            raise
        return handle, attempt

    def _prepare(self, spec: AssignSpec, workdir: Path) -> Attempt | SpawnFailed:
        # Synchronous on purpose: writing two small files takes less than the hop to a
        # worker thread would.
        try:
            return self._launcher.prepare(spec, workdir.absolute())
        except (OSError, ValueError) as exc:
            return SpawnFailed(f"treadle: cannot run {spec.argv[0]!r}: {describe(exc)}\n")

    def _schedule_sweep(self) -> None:
        if self._sweep is None:
            self._sweep = asyncio.get_running_loop().call_later(_SWEEP_DELAY_S, self._do_sweep)

    def _do_sweep(self) -> None:
        self._sweep = None
        reaper.reap_orphans()


class ProcessHandle:
    """One running program. Its output iterator is the handle itself."""

    def counters(self) -> GroupUsage | None:
        """The cgroup counters of what it runs, where its tier keeps a cgroup; else None."""
        counters = getattr(self._attempt, "counters", None)
        return counters() if callable(counters) else None

    @classmethod
    async def spawn(
        cls,
        loop: asyncio.AbstractEventLoop,
        *,
        attempt: Attempt,
        stdin: str | None,
        timeout_s: float,
        drain_timeout_s: float,
        on_exit: Callable[[], None],
    ) -> ProcessHandle:
        launch = attempt.launch
        parent: list[int] = []  # our ends, closed here if anything fails
        child: list[int] = []  # the child's ends, closed here once it has them
        try:
            if launch.result is not None:
                res_r, res_w = launch.result
                parent.append(res_r)
                child.append(res_w)
            out_r, out_w = os.pipe()
            err_r, err_w = os.pipe()
            if launch.result is None:
                res_r, res_w = os.pipe()
                parent.append(res_r)
                child.append(res_w)
            parent += (out_r, err_r)
            child += (out_w, err_w)
            stdin_data = stdin.encode() if stdin else b""
            stdin_w: int | None = None
            if stdin_data:
                stdin_r, stdin_w = os.pipe()
                parent.append(stdin_w)
            else:
                stdin_r = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            child.append(stdin_r)
            fds = {0: stdin_r, 1: out_w, 2: err_w, RESULT_FD: res_w, **launch.fds}
            pid = await spawn_async(
                launch.program, launch.argv, launch.env, launch.cwd, fds, ids=launch.ids
            )
            started = time.monotonic()
            pidfd = _watch(pid)
        except BaseException:
            for fd in parent:
                os.close(fd)
            raise
        finally:
            for fd in child:
                os.close(fd)
        return cls(
            loop,
            pid=pid,
            pidfd=pidfd,
            stdout=out_r,
            stderr=err_r,
            result=res_r,
            stdin=stdin_w,
            stdin_data=stdin_data,
            timeout_s=timeout_s,
            attempt=attempt,
            started=started,
            drain_timeout_s=drain_timeout_s,
            on_exit=on_exit,
        )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        *,
        pid: int,
        pidfd: int,
        stdout: int,
        stderr: int,
        result: int,
        stdin: int | None,
        stdin_data: bytes,
        timeout_s: float,
        attempt: Attempt,
        started: float,
        drain_timeout_s: float,
        on_exit: Callable[[], None],
    ) -> None:
        self.pid = pid
        self._loop = loop
        self._pidfd = pidfd
        self._attempt = attempt
        self._settled = False  # the attempt's processes beyond the spawned one have ended
        self._started = started
        self._drain_timeout_s = drain_timeout_s
        self._on_exit_hook = on_exit
        # Open read ends: fd -> the stream it carries (None for the result pipe).
        self._fds: dict[int, Stream | None] = {stdout: "stdout", stderr: "stderr", result: None}
        self._streams_open = 2
        self._queue: deque[tuple[Stream, bytes]] = deque()
        self._queued = 0
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None
        self._result = ResultLines(RESULT_LINE_LIMIT)
        self._kill_reason: str | None = None
        self._wait_status: int | None = None
        self._usage = Usage()
        self._drain_timer: asyncio.TimerHandle | None = None
        self._done: asyncio.Future[ExitStatus] = loop.create_future()
        self._stdin = stdin
        self._stdin_data = memoryview(stdin_data)
        self._stdin_watched = False

        for fd in self._fds:
            os.set_blocking(fd, False)
            loop.add_reader(fd, self._on_readable, fd)
        loop.add_reader(pidfd, self._on_exit)
        self._timer = loop.call_later(timeout_s, self._kill, exits.TIMEOUT)
        if stdin is not None:
            os.set_blocking(stdin, False)
            self._write_stdin()

    # RuntimeHandle

    def output(self) -> ProcessHandle:
        return self

    def __aiter__(self) -> ProcessHandle:
        return self

    async def __anext__(self) -> tuple[Stream, bytes]:
        while not self._queue:
            if not self._streams_open:
                raise StopAsyncIteration
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        item = self._queue.popleft()
        self._queued -= len(item[1])
        if self._paused and self._queued <= _BUFFER_LOW:
            self._resume()
        return item

    async def wait(self) -> ExitStatus:
        return await asyncio.shield(self._done)

    def kill(self) -> None:
        self._kill(exits.CANCELLED)

    # Event loop callbacks

    def _on_readable(self, fd: int) -> None:
        try:
            data = os.read(fd, _READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._close(fd)
            return
        stream = self._fds[fd]
        if stream is None:
            self._result.feed(data)
            return
        self._queue.append((stream, data))
        self._queued += len(data)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
        # Once the program is gone, pausing would only leave its last output in the pipe.
        if self._queued >= _BUFFER_HIGH and self._wait_status is None:
            self._pause()

    def _on_exit(self) -> None:
        # The leader is a zombie until wait4 below, so its pid (which is also the process
        # group id) cannot be reused yet: kill what is left of the group first.
        _kill_group(self.pid)
        try:
            pid, status, rusage = os.wait4(self.pid, os.WNOHANG)
        except ChildProcessError:  # reaped behind our back; nothing better to report
            pid, status, rusage = self.pid, 255 << 8, None
        if pid == 0:
            return  # spurious wake-up: stay registered
        self._loop.remove_reader(self._pidfd)
        os.close(self._pidfd)
        reaper.untrack(self.pid)
        self._timer.cancel()
        self._wait_status = status
        self._usage = Usage(
            wall_ms=(time.monotonic() - self._started) * 1000,
            cpu_ms=(rusage.ru_utime + rusage.ru_stime) * 1000 if rusage else None,
            # ru_maxrss is not reported: the child shared Shuttle's memory until exec (vfork),
            # and Linux counts that high-water mark as the child's.
        )
        if self._paused:
            self._resume()
        self._drain_timer = self._loop.call_later(self._drain_timeout_s, self._abandon_pipes)
        self._on_exit_hook()
        try:
            self._attempt.exited(self._settle)
        except Exception:
            log.exception("after the exit of process %d", self.pid)
            self._settle()

    def _settle(self) -> None:
        self._settled = True
        self._maybe_finish()

    def _write_stdin(self) -> None:
        assert self._stdin is not None
        try:
            written = os.write(self._stdin, self._stdin_data)
        except BlockingIOError:
            written = 0
        except OSError:  # the program closed its stdin: the rest is not wanted
            self._close_stdin()
            return
        self._stdin_data = self._stdin_data[written:]
        if not self._stdin_data:
            self._close_stdin()
        elif not self._stdin_watched:
            self._loop.add_writer(self._stdin, self._write_stdin)
            self._stdin_watched = True

    # Internals

    def _kill(self, reason: str) -> None:
        if self._wait_status is not None or self._kill_reason is not None:
            return
        self._kill_reason = reason
        _kill_group(self.pid)
        self._attempt.kill()

    def _pause(self) -> None:
        self._paused = True
        for fd, stream in self._fds.items():
            if stream is not None:
                self._loop.remove_reader(fd)

    def _resume(self) -> None:
        self._paused = False
        for fd, stream in self._fds.items():
            if stream is not None:
                self._loop.add_reader(fd, self._on_readable, fd)

    def _close(self, fd: int) -> None:
        self._loop.remove_reader(fd)
        os.close(fd)
        if self._fds.pop(fd) is not None:
            self._streams_open -= 1
            if self._waiter is not None and not self._waiter.done():
                self._waiter.set_result(None)
        self._maybe_finish()

    def _close_stdin(self) -> None:
        if self._stdin is None:
            return
        if self._stdin_watched:
            self._loop.remove_writer(self._stdin)
            self._stdin_watched = False
        os.close(self._stdin)
        self._stdin = None
        self._stdin_data = memoryview(b"")

    def _abandon_pipes(self) -> None:
        for fd in list(self._fds):
            self._close(fd)

    def _maybe_finish(self) -> None:
        if self._wait_status is None or self._fds or not self._settled or self._done.done():
            return
        if self._drain_timer is not None:
            self._drain_timer.cancel()
        self._close_stdin()
        code = os.waitstatus_to_exitcode(self._wait_status)
        reason = self._kill_reason
        if reason is None and code < 0:
            reason = exits.killed_by(-code)
        status = ExitStatus(code, reason, self._result.value(), self._usage)
        try:
            status = self._attempt.finish(status)
        except Exception:
            log.exception("cleaning up after process %d", self.pid)
        self._done.set_result(status)


class ResultLines:
    """The result: of the last complete lines of fd 3 (those within `limit` bytes together,
    the newest always), the newest that parses as JSON. Lines are kept as bytes and parsed
    once the program has ended, newest first: parsing each line as it came let a program
    that wrote one large line again and again keep Shuttle busy parsing (measured: 79 ms of
    the program's CPU cost 10 s of Shuttle's). Lines longer than the limit are skipped (and
    not buffered); reading goes on so the program never blocks on fd 3."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._partial = bytearray()
        self._skipping = False
        self._recent: deque[bytes] = deque()
        self._kept = 0  # bytes in _recent

    def feed(self, data: bytes) -> None:
        start = 0
        while (end := data.find(b"\n", start)) != -1:
            if self._skipping:
                self._skipping = False
            else:
                self._partial += data[start:end]
                self._keep(bytes(self._partial))
            self._partial.clear()
            start = end + 1
        if not self._skipping:
            self._partial += data[start:]
            if len(self._partial) > self._limit:
                self._partial.clear()
                self._skipping = True

    def _keep(self, line: bytes) -> None:
        if not line.strip():
            return
        self._recent.append(line)
        self._kept += len(line)
        while self._kept > self._limit and len(self._recent) > 1:
            self._kept -= len(self._recent.popleft())

    def value(self) -> Any:
        for line in reversed(self._recent):
            try:
                return json.loads(line, parse_constant=_reject_constant)
            except ValueError:
                continue
            except RecursionError:
                # Nested past what the parser can take, so past the protocol's depth limit
                # too: a value just past that limit stands for it, and the exit report
                # refuses it as every too-deep result (`Exited.report`).
                return _nested(MAX_JSON_DEPTH + 1)
        return None


def _nested(depth: int) -> Any:
    value: Any = []
    for _ in range(depth - 1):
        value = [value]
    return value


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def workdir_files(spec: AssignSpec) -> list[tuple[str, bytes, int]]:
    """The files an attempt's work dir starts with: (name, content, mode)."""
    files = [] if spec.no_args else [(ARGS_FILE, json.dumps(spec.args).encode(), 0o600)]
    if spec.source is not None:
        name = spec.source_name
        if name in ("", ".", "..") or "/" in name or name == ARGS_FILE:
            raise ValueError(f"invalid source_name {name!r}")
        mode = 0o700 if spec.source.startswith("#!") else 0o600
        files.append((name, spec.source.encode(), mode))
    return files


def _prepare_workdir(spec: AssignSpec, workdir: Path) -> None:
    if workdir.exists():  # left over by a crash, or a retried assignment
        shutil.rmtree(workdir)
    files = workdir_files(spec)
    workdir.mkdir(mode=0o700, parents=True)
    for name, data, mode in files:
        _write(workdir / name, data, mode)


def _write(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def environment(spec: AssignSpec, home: str, image_env: Sequence[str] = ()) -> dict[str, str]:
    """The program's environment, with `home` (its work dir, as the program sees it) as
    HOME, TMPDIR and the place of the args file. `image_env`: an image's configured
    variables (`KEY=VALUE`), over the defaults and under the function's own (those with a
    name treadle keeps, `TREADLE_*`, or that no environment can hold are left out)."""
    # Built from scratch: Shuttle's own environment may hold its join token.
    env = {"PATH": PATH, "LANG": "C.UTF-8"}
    for item in image_env:
        key, _, value = item.partition("=")
        # An image's own names only: not treadle's, which tell the agent what it may do.
        if key and "\0" not in item and not key.startswith("TREADLE_"):
            env[key] = value
    env.update(HOME=home, TMPDIR=home)
    env.update(spec.env)
    env.update(
        TREADLE_EXECUTION_ID=spec.id,
        TREADLE_ATTEMPT=str(spec.attempt),
        TREADLE_FUNCTION=spec.function,
        TREADLE_RESULT_FD=str(RESULT_FD),
    )
    if not spec.no_args:
        env["TREADLE_ARGS_FILE"] = f"{home}/{ARGS_FILE}"
    return env


def _watch(pid: int) -> int:
    """A pidfd of the child `pid`, which this process reaps from now on."""
    reaper.track(pid)
    try:
        return os.pidfd_open(pid)
    except OSError:
        _kill_group(pid)
        os.waitpid(pid, 0)
        reaper.untrack(pid)
        raise


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)
