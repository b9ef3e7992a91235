"""The OCI runtime programs behind the `oci` (crun, else runc) and `gvisor` (runsc) tiers:
finding them, proving they work on this host, the command lines that drive a container,
telling how one ended, and sweeping up after a Shuttle that died with containers running.

A container's life, as a runtime drives it (`ContainerProcess` does it synchronously)::

    read, write = bundle.open_result()
    argv = tool.run_argv(bundle, log=...)   # spawn with fd 3 = `write`; the container ends
                                            # when this process exits
    tool.kill_argv(id)                      # to stop it early; never SIGKILL the process
                                            # itself: the container would outlive it
    oom_kills(bundle.cgroups_path)          # before delete (only runc keeps the cgroup
    oom_log.take(bundle.cgroups_path)       # until then; the kernel log tells for all)
    classify_exit(code, oom_kills=..., killed=...)
    tool.delete_argv(id)                    # always; then remove_cgroups(bundle.cgroups_path)
                                            # and bundle.remove()

Every tool gets a state directory of its own (`--root`), so that `sweep` can tell the
containers of this Shuttle from anybody else's.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import select
import shutil
import signal
import subprocess
import tempfile
import time
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from treadle.domain.resources import Tier
from treadle.shuttle.oci.bundle import (
    CGROUP_PARENT,
    CONTAINER_PREFIX,
    Bundle,
    Identity,
    Limits,
    RuntimeTraits,
    new_container_id,
    prepare_bundle,
)
from treadle.shuttle.oci.rootfs import Rootfs
from treadle.shuttle.runtimes._spawn import spawn
from treadle.shuttle.sandbox import exits
from treadle.shuttle.sandbox.cgroups import Group

__all__ = [
    "ContainerProcess",
    "ContainerRun",
    "OciTool",
    "OomLog",
    "ProbeResult",
    "SweepReport",
    "ToolKind",
    "cgroup_dirs",
    "classify_exit",
    "find_tools",
    "oom_kills",
    "probe",
    "remove_cgroups",
    "run_container",
    "runtime_error",
    "sweep",
    "usable_tools",
]

_SEARCH_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# runsc's platforms, best first: systrap (2023+) is faster than ptrace; kvm needs real
# hardware virtualization, which a host may claim and not have, so it is never
# picked automatically.
_RUNSC_PLATFORMS = ("systrap", "ptrace")
# The gVisor sandbox's own threads (sentry, gofer) and its platform's host tasks for each
# task of the program count against the pids limit of its cgroup, which is only a backstop:
# the program's own limit is RLIMIT_NPROC, which the sentry enforces. Measured here: ptrace
# ~52 + ~5.5 per live program process, and ~300 host tasks kept after 32 processes came and
# went (its stubs are pooled); systrap ~27 + ~2.
_RUNSC_PIDS_OVERHEAD = 128
_RUNSC_PIDS_PER_TASK = {"ptrace": 12, "systrap": 6}
_RUNSC_MEMORY_OVERHEAD_MIB = 64
# Its kernel (the sentry) and gofer run in the sandbox's cgroup too, and a start alone costs
# them ~140 ms of CPU: held to a small share (10 millicores: 10 ms a second) one `echo` took
# over ten seconds. The sandbox's CPU limit is the function's share plus one CPU, as its
# memory limit is its own plus the sentry's.
_RUNSC_CPU_OVERHEAD_MILLICORES = 1000
_HYBRID_HINT = (
    "crun refuses hybrid cgroups while the unified hierarchy holds a controller "
    "(hugetlb here); run scripts/setup-cgroups as root to move hugetlb to a v1 hierarchy"
)
_GRACE_S = 10.0


class ToolKind(StrEnum):
    CRUN = "crun"
    RUNC = "runc"
    RUNSC = "runsc"


@dataclass(frozen=True, slots=True)
class OciTool:
    """One runtime program, how to call it, and what its bundles need.

    `passes_fds`: it forwards fd 3 to the container (crun, runc, runsc with --pass-fd);
    otherwise bundles carry a result FIFO. `platform` is runsc's (systrap or ptrace)."""

    kind: ToolKind
    path: str
    state_root: Path
    platform: str | None = None
    passes_fds: bool = True

    @property
    def tier(self) -> Tier:
        return Tier.GVISOR if self.kind is ToolKind.RUNSC else Tier.OCI

    @property
    def name(self) -> str:
        return f"{self.kind}:{self.platform}" if self.platform else str(self.kind)

    @property
    def traits(self) -> RuntimeTraits:
        if self.kind is ToolKind.RUNSC:
            return RuntimeTraits(
                result_fifo=not self.passes_fds,
                # The sentry answers clone3 with ENOSYS itself, while its OCI seccomp support
                # turns any errno rule into EPERM, which makes libc's threads fail.
                seccomp_clone3=False,
                pids_per_task=_RUNSC_PIDS_PER_TASK.get(self.platform or "ptrace", 12),
                pids_overhead=_RUNSC_PIDS_OVERHEAD,
                memory_overhead_mib=_RUNSC_MEMORY_OVERHEAD_MIB,
                cpu_overhead_millicores=_RUNSC_CPU_OVERHEAD_MILLICORES,
            )
        return RuntimeTraits()

    def global_argv(self) -> list[str]:
        argv = [self.path, "--root", str(self.state_root)]
        if self.kind is ToolKind.RUNSC:
            argv += [
                f"--platform={self.platform or 'ptrace'}",
                # No network at all; the default sandbox network also needs iptables.
                "--network=none",
                # Without it runsc ignores the bundle's seccomp profile.
                "--oci-seccomp",
            ]
            if not self.passes_fds:
                argv.append("--host-fifo=open")
        return argv

    def run_argv(self, bundle: Bundle, *, log: Path | None = None) -> list[str]:
        """Create and run the container in the foreground: the process exits with the
        program's exit code (128 + signal when a signal ended it). `log` receives the
        runtime's own errors (they also go to stderr): see `runtime_error`."""
        argv = self.global_argv()
        if log is not None:
            if self.kind is ToolKind.CRUN:
                argv.append(f"--log=file:{log}")
            elif self.kind is ToolKind.RUNC:
                argv += ["--log", str(log), "--log-format", "json"]
            else:
                argv.append(f"--log={log}")
        argv += ["run", "--bundle", str(bundle.path)]
        if self.kind is ToolKind.RUNSC:
            if self.passes_fds:
                argv.append("--pass-fd=3:3")
        else:
            argv += ["--preserve-fds", "1"]
            if self.kind is ToolKind.RUNC:
                # Keep the cgroup (and its OOM counter) until `delete`.
                argv.append("--keep")
        return [*argv, bundle.container_id]

    def kill_argv(self, container_id: str, sig: str = "KILL") -> list[str]:
        return [*self.global_argv(), "kill", "--all", container_id, sig]

    def delete_argv(self, container_id: str) -> list[str]:
        return [*self.global_argv(), "delete", "--force", container_id]

    def list_argv(self) -> list[str]:
        return [*self.global_argv(), "list", "--quiet"]

    def containers(self, timeout_s: float = 30.0) -> list[str]:
        """The ids of the containers in this tool's state directory."""
        if not self.state_root.is_dir():
            return []
        proc = subprocess.run(
            self.list_argv(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout_s,
            check=False,
        )
        if proc.returncode != 0:
            raise OSError(f"{self.name} list failed: {_tail(proc.stderr)}")
        return [line for line in proc.stdout.decode().split() if line]

    def kill(self, container_id: str, timeout_s: float = 30.0) -> None:
        _quiet(self.kill_argv(container_id), timeout_s)

    def delete(self, container_id: str, timeout_s: float = 30.0) -> None:
        """Delete the container (killing it if it still runs); no error if it is gone."""
        _quiet(self.delete_argv(container_id), timeout_s)

    def pause(self, container_id: str, timeout_s: float = 30.0) -> None:
        """Freeze every process of the container (gVisor: its whole sandbox) in place."""
        self._checked("pause", container_id, timeout_s)

    def resume(self, container_id: str, timeout_s: float = 30.0) -> None:
        self._checked("resume", container_id, timeout_s)

    def _checked(self, verb: str, container_id: str, timeout_s: float) -> None:
        proc = subprocess.run(
            [*self.global_argv(), verb, container_id],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout_s,
            check=False,
        )
        if proc.returncode != 0:
            raise OSError(f"{self.name} {verb} failed: {_tail(proc.stderr)}")


_LOG_TAIL_BYTES = 64 * 1024


def runtime_error(tool: OciTool, log: Path) -> str | None:
    """The runtime's own error from its `run_argv` log, None when it reported none: tells a
    container that could not start from a program that failed."""
    try:
        with open(log, "rb") as f:
            # The end of it only: what the runtime says last is why it stopped, and nothing
            # of a log's size may cost Shuttle more than this.
            f.seek(max(0, os.fstat(f.fileno()).st_size - _LOG_TAIL_BYTES))
            text = f.read(_LOG_TAIL_BYTES).decode(errors="replace")
    except FileNotFoundError:
        return None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if tool.kind is ToolKind.RUNSC:
        lines = [line for line in lines if "FATAL ERROR" in line]
    elif tool.kind is ToolKind.RUNC:
        lines = [line for line in lines if '"level":"error"' in line or '"level":"fatal"' in line]
    return lines[-1] if lines else None


# Finding and probing


def find_tools(
    state_dir: Path,
    *,
    search_path: str | None = None,
    paths: dict[ToolKind, str] | None = None,
) -> list[OciTool]:
    """Every runtime installed here, best first, each with its state under `state_dir`:
    crun, runc, then runsc once per platform its build supports (systrap before ptrace).
    `paths` names a program explicitly (e.g. a runsc outside PATH)."""
    path = search_path or f"{os.environ.get('PATH', '')}:{_SEARCH_PATH}"
    state_dir = state_dir.resolve()
    tools: list[OciTool] = []
    for kind in ToolKind:
        program = (paths or {}).get(kind) or shutil.which(kind.value, path=path)
        if program is None:
            continue
        root = state_dir / kind.value
        if kind is not ToolKind.RUNSC:
            tools.append(OciTool(kind, program, root))
            continue
        platforms = _runsc_platforms(program)
        passes_fds = "-pass-fd" in _help(program, ["run", "--help"])
        tools += [
            OciTool(kind, program, root, platform=p, passes_fds=passes_fds)
            for p in _RUNSC_PLATFORMS
            if p in platforms
        ]
    return tools


@dataclass(frozen=True, slots=True)
class ProbeResult:
    tool: OciTool
    ok: bool
    detail: str
    seconds: float
    userns: bool


def probe(
    tool: OciTool,
    rootfs: Rootfs,
    work_dir: Path,
    *,
    identity: Identity | None = None,
    timeout_s: float = 30.0,
) -> ProbeResult:
    """Run a real container with `tool` (a shell that writes "ok" to fd 3) and report
    whether it worked. Tries a user namespace first, then without one."""
    identities = [identity] if identity is not None else [Identity(), Identity(userns=None)]
    started = time.monotonic()
    detail = ""
    for candidate in identities:
        run = _probe_once(tool, rootfs, work_dir, candidate, timeout_s)
        if run.exit_code == 0 and run.result.strip() == b"ok":
            return ProbeResult(
                tool, True, "ok", time.monotonic() - started, candidate.userns is not None
            )
        detail = _describe_failure(run)
    return ProbeResult(tool, False, detail, time.monotonic() - started, False)


def usable_tools(
    state_dir: Path,
    rootfs: Rootfs,
    work_dir: Path,
    *,
    paths: dict[ToolKind, str] | None = None,
    timeout_s: float = 30.0,
) -> tuple[dict[Tier, ProbeResult], list[ProbeResult]]:
    """Probe the installed runtimes; the first that works for each tier (crun before runc,
    systrap before ptrace), and every probe made (to log why others were passed over)."""
    chosen: dict[Tier, ProbeResult] = {}
    probes: list[ProbeResult] = []
    for tool in find_tools(state_dir, paths=paths):
        if tool.tier in chosen:
            continue
        result = probe(tool, rootfs, work_dir, timeout_s=timeout_s)
        probes.append(result)
        if result.ok:
            chosen[tool.tier] = result
    return chosen, probes


def _probe_once(
    tool: OciTool, rootfs: Rootfs, work_dir: Path, identity: Identity, timeout_s: float
) -> ContainerRun:
    base = Path(tempfile.mkdtemp(prefix="probe-", dir=work_dir))
    # The sandbox user must reach its work directory in a user namespace.
    base.chmod(0o711)
    try:
        workdir = base / "work"
        workdir.mkdir()
        bundle = prepare_bundle(
            base / "bundles",
            container_id=new_container_id("probe", 1),
            argv=["/bin/sh", "-c", "echo ok >&3"],
            env={},
            rootfs=rootfs,
            workdir=workdir,
            limits=Limits(memory_mib=64, cpu_millicores=1000, pids=32),
            identity=identity,
            traits=tool.traits,
        )
        return run_container(tool, bundle, timeout_s=timeout_s)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _describe_failure(run: ContainerRun) -> str:
    detail = run.runtime_error or _tail(run.stderr) or f"exit code {run.exit_code}"
    if run.timed_out:
        detail = f"no exit within the timeout ({detail})"
    if "hybrid mode" in detail:
        detail = f"{detail}: {_HYBRID_HINT}"
    return detail


def _runsc_platforms(program: str) -> set[str]:
    text = _help(program, ["help", "platforms"])
    found = {line.strip() for line in text.splitlines() if line.strip()}
    # Builds without the `platforms` topic know ptrace and kvm only.
    return found if found & set(_RUNSC_PLATFORMS) else {"ptrace"}


def _help(program: str, args: list[str]) -> str:
    try:
        proc = subprocess.run(
            [program, *args],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return (proc.stdout + proc.stderr).decode(errors="replace")


# Running a container synchronously (probes, tests, benchmarks)


@dataclass(frozen=True, slots=True)
class ContainerRun:
    """How a container run by `run_container` ended. `exit_code` is the runtime process's
    (None when it could not be spawned); `oom_kills` is None where it could not be read."""

    exit_code: int | None
    stdout: bytes
    stderr: bytes
    result: bytes
    seconds: float
    timed_out: bool = False
    oom_kills: int | None = None
    runtime_error: str | None = None
    reason: str | None = None


def run_container(
    tool: OciTool,
    bundle: Bundle,
    *,
    stdin: bytes = b"",
    timeout_s: float = 60.0,
    oom_log: OomLog | None = None,
    remove: bool = True,
) -> ContainerRun:
    """Run `bundle` to the end with `tool` (see `ContainerProcess`)."""
    try:
        container = ContainerProcess.start(tool, bundle, stdin=stdin)
    except OSError as exc:
        if remove:
            bundle.remove()
        return ContainerRun(None, b"", str(exc).encode(), b"", 0.0, reason=exits.SPAWN_FAILED)
    return container.finish(timeout_s=timeout_s, oom_log=oom_log, remove=remove)


class ContainerProcess:
    """A container in the foreground of its runtime process: stdin fed from memory,
    stdout, stderr and the fd 3 result collected. Blocking and synchronous - for probes,
    tests and benchmarks; the event-loop runtime drives the same argv its own way."""

    def __init__(
        self, tool: OciTool, bundle: Bundle, log: Path, pid: int, pidfd: int, fds: _Fds
    ) -> None:
        self.tool = tool
        self.bundle = bundle
        self.log = log
        self.pid = pid
        self._pidfd = pidfd
        self._fds = fds
        self._started = time.monotonic()
        self._status: int | None = None
        self._buffers = {fd: bytearray() for fd in (fds.stdout, fds.stderr, fds.result)}
        self._open = set(self._buffers)

    @classmethod
    def start(
        cls, tool: OciTool, bundle: Bundle, *, stdin: bytes = b"", log: Path | None = None
    ) -> ContainerProcess:
        """Spawn the runtime; raises OSError when it cannot be spawned."""
        log = log or bundle.path / "runtime.log"
        argv = tool.run_argv(bundle, log=log)
        parent: list[int] = []
        child: list[int] = []
        try:
            in_r, in_w = os.pipe2(os.O_CLOEXEC)
            parent.append(in_w)
            child.append(in_r)
            out_r, out_w = os.pipe2(os.O_CLOEXEC)
            parent.append(out_r)
            child.append(out_w)
            err_r, err_w = os.pipe2(os.O_CLOEXEC)
            parent.append(err_r)
            child.append(err_w)
            res_r, res_w = bundle.open_result()
            parent.append(res_r)
            child.append(res_w)
            pid = spawn(
                argv[0],
                argv,
                {"PATH": _SEARCH_PATH},
                Path("/"),
                {0: in_r, 1: out_w, 2: err_w, 3: res_w},
            )
            pidfd = os.pidfd_open(pid)
        except BaseException:
            for fd in parent:
                os.close(fd)
            raise
        finally:
            for fd in child:
                os.close(fd)
        for fd in (in_w, out_r, err_r, res_r):
            os.set_blocking(fd, False)
        return cls(tool, bundle, log, pid, pidfd, _Fds(in_w, out_r, err_r, res_r, stdin))

    @property
    def stdout(self) -> bytes:
        return bytes(self._buffers[self._fds.stdout])

    def read_until(self, marker: bytes, timeout_s: float = 60.0) -> bool:
        """Collect output until stdout holds `marker` (True), or until the container exited
        or the timeout passed (False)."""
        deadline = time.monotonic() + timeout_s
        while marker not in self._buffers[self._fds.stdout]:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or (self._status is not None and not self._open):
                return False
            self._step(remaining)
        return True

    def finish(
        self,
        *,
        timeout_s: float = 60.0,
        oom_log: OomLog | None = None,
        killed: bool = False,
        remove: bool = True,
    ) -> ContainerRun:
        """Wait for the end (after `timeout_s`, kill the container through the runtime),
        then delete the container and, with `remove`, the bundle. `killed`: the caller
        killed it, so no reason is inferred from the exit."""
        timed_out = False
        try:
            # Deadlines, in turn: the timeout (then the runtime kills the container), a
            # grace period for that (then the runtime process itself is killed), one for
            # the pipes once it exited.
            stage = 0
            deadline = self._started + timeout_s
            while self._status is None or self._open:
                remaining = deadline - time.monotonic()
                if remaining > 0:
                    self._step(remaining)
                    if self._status is not None:
                        deadline = min(deadline, time.monotonic() + _GRACE_S)
                    continue
                if self._status is not None:
                    break  # something outside the container holds a pipe: stop reading
                if stage == 0:
                    timed_out = True
                    self.tool.kill(self.bundle.container_id)
                else:
                    os.kill(self.pid, signal.SIGKILL)
                stage += 1
                deadline = time.monotonic() + _GRACE_S
            status = self._status
            assert status is not None
            exit_code = os.waitstatus_to_exitcode(status)
            kills = oom_kills(self.bundle.cgroups_path)
            if oom_log is not None:
                kills = max(kills or 0, oom_log.take(self.bundle.cgroups_path)) or kills
            if timed_out:
                reason: str | None = "timeout"
            elif killed:
                reason = "cancelled"
            else:
                reason = classify_exit(exit_code, oom_kills=kills or 0, killed=False)
            return ContainerRun(
                exit_code,
                bytes(self._buffers[self._fds.stdout]),
                bytes(self._buffers[self._fds.stderr]),
                bytes(self._buffers[self._fds.result]),
                time.monotonic() - self._started,
                timed_out=timed_out,
                oom_kills=kills,
                runtime_error=runtime_error(self.tool, self.log) if exit_code else None,
                reason=reason,
            )
        finally:
            self._close()
            self.tool.delete(self.bundle.container_id)
            # runsc leaves the cgroup behind when its sandbox failed to start.
            remove_cgroups(self.bundle.cgroups_path)
            if remove:
                self.bundle.remove()

    def abandon(self) -> None:
        """Kill the runtime process and let go of the container, which goes on running: what
        happens to containers when their Shuttle dies (`sweep` is for them)."""
        os.kill(self.pid, signal.SIGKILL)
        _, self._status = os.waitpid(self.pid, 0)
        self._close()

    def _step(self, timeout_s: float) -> None:
        fds = self._fds
        readers = [*self._open] + ([self._pidfd] if self._status is None else [])
        writers = [fds.stdin] if fds.stdin is not None else []
        ready_r, ready_w, _ = select.select(readers, writers, [], timeout_s)
        if ready_w:
            self._write_stdin()
        for fd in ready_r:
            if fd == self._pidfd:
                _, self._status = os.waitpid(self.pid, 0)
                continue
            chunk = _read(fd)
            if chunk is None:
                continue
            if chunk:
                self._buffers[fd] += chunk
            else:
                self._open.discard(fd)
                os.close(fd)

    def _write_stdin(self) -> None:
        fds = self._fds
        assert fds.stdin is not None
        try:
            written = os.write(fds.stdin, fds.pending) if fds.pending else 0
        except BlockingIOError:
            return
        except OSError:  # the program closed its stdin: the rest is not wanted
            written = len(fds.pending)
        fds.pending = fds.pending[written:]
        if not fds.pending:
            os.close(fds.stdin)
            fds.stdin = None

    def _close(self) -> None:
        for fd in self._open:
            os.close(fd)
        self._open.clear()
        if self._fds.stdin is not None:
            os.close(self._fds.stdin)
            self._fds.stdin = None
        if self._status is None:
            with contextlib.suppress(ChildProcessError):
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
        os.close(self._pidfd)


@dataclass(slots=True)
class _Fds:
    stdin: int | None
    stdout: int
    stderr: int
    result: int
    pending: bytes


def _read(fd: int) -> bytes | None:
    """A chunk, b"" at end of file, None when nothing is there after all."""
    try:
        return os.read(fd, 65536)
    except BlockingIOError:
        return None
    except OSError:
        return b""


# How a container ended


def oom_kills(cgroups_path: str) -> int | None:
    """OOM kills the kernel counted in the container's memory cgroup, None when the cgroup
    no longer exists. crun and runsc remove it when the container exits; runc (`--keep`)
    only at `delete`."""
    group = Group.at(cgroups_path)
    return group.usage().oom_kills if group.dirs else None


def peak_memory_kib(cgroups_path: str) -> int | None:
    """The container's peak memory, None where the cgroup is gone or the kernel keeps no
    peak."""
    peak = Group.at(cgroups_path).usage().peak_bytes
    return None if peak is None else peak // 1024


class OomLog:
    """OOM kills per memory cgroup, from the kernel log (`/dev/kmsg`), counted from the
    moment it was opened. The kernel logs each kill with the memory cgroup of the victim
    ("task_memcg=") before sending SIGKILL, so the record is there by the time the runtime
    reports the exit - also where the runtime has already removed the cgroup.

    One per Shuttle; `take(path)` after each container exits. Only cgroups under
    `cgroup_parent` are remembered. `available` is False where the log cannot be read
    (no /dev/kmsg, or not root): then only `oom_kills` and exit codes tell."""

    _RECORD = re.compile(r"oom-kill:.*?task_memcg=(?P<memcg>[^,\s]+)")

    def __init__(self, cgroup_parent: str = CGROUP_PARENT) -> None:
        self._prefix = "/" + cgroup_parent.strip("/") + "/"
        self._counts: dict[str, int] = {}
        self._fd: int | None = None
        try:
            fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return
        try:
            os.lseek(fd, 0, os.SEEK_END)
        except OSError:
            os.close(fd)
            return
        self._fd = fd
        # One per Shuttle in service; tests and benchmarks make many.
        self._closer = weakref.finalize(self, os.close, fd)

    @property
    def available(self) -> bool:
        return self._fd is not None

    def take(self, cgroups_path: str) -> int:
        """The kills recorded for this cgroup since the last `take` of it."""
        self._drain()
        return self._counts.pop("/" + cgroups_path.strip("/"), 0)

    def close(self) -> None:
        if self._fd is not None:
            self._closer()
            self._fd = None

    def _drain(self) -> None:
        if self._fd is None:
            return
        while True:
            try:
                record = os.read(self._fd, 8192)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno == errno.EPIPE:  # records were overwritten: go on with newer
                    continue
                return
            if not record:
                return
            match = self._RECORD.search(record.decode(errors="replace"))
            if match and match["memcg"].startswith(self._prefix):
                self._counts[match["memcg"]] = self._counts.get(match["memcg"], 0) + 1


def classify_exit(exit_code: int | None, *, oom_kills: int, killed: bool) -> str | None:
    """The `ExitStatus.reason` for a container whose runtime exited with `exit_code`, as the
    sandbox layer reads every tier's exits (`treadle.shuttle.sandbox.exits`). `killed`:
    Shuttle killed it itself (timeout or cancel), whose reason it knows better."""
    if killed and exit_code is not None:
        return None
    return exits.classify(exit_code, None, oom_killed=bool(oom_kills), pids_denied=False)[1]


# Sweeping up


@dataclass(frozen=True, slots=True)
class SweepReport:
    containers: list[str]
    cgroups: list[str]
    bundles: list[str]
    errors: list[str]


def sweep(
    tools: Iterable[OciTool],
    *,
    bundles_dir: Path | None = None,
    cgroup_parent: str = CGROUP_PARENT,
    timeout_s: float = 30.0,
) -> SweepReport:
    """Remove what containers of a Shuttle that is gone left behind: containers still in
    the tools' state directories (killed and deleted), their cgroups under `cgroup_parent`
    (whatever still runs in them is killed first), and bundle directories. Call it at
    start-up, before this Shuttle starts containers of its own: it removes all of them."""
    containers: list[str] = []
    errors: list[str] = []
    seen_roots: set[Path] = set()
    for tool in tools:
        if tool.state_root in seen_roots:
            continue
        seen_roots.add(tool.state_root)
        try:
            ids = tool.containers(timeout_s)
        except (OSError, subprocess.TimeoutExpired) as exc:
            errors.append(str(exc))
            continue
        for container_id in ids:
            tool.kill(container_id, timeout_s)
            tool.delete(container_id, timeout_s)
            containers.append(container_id)
    cgroups = _sweep_cgroups(cgroup_parent, errors)
    bundles: list[str] = []
    if bundles_dir is not None and bundles_dir.is_dir():
        for entry in bundles_dir.iterdir():
            if entry.name.startswith(CONTAINER_PREFIX):
                shutil.rmtree(entry, ignore_errors=True)
                bundles.append(entry.name)
    return SweepReport(containers, cgroups, bundles, errors)


def cgroup_dirs(cgroups_path: str) -> list[Path]:
    """Where a cgroup path exists in every mounted hierarchy (v1 controllers, v2)."""
    return Group.at(cgroups_path).dirs


def remove_cgroups(cgroups_path: str) -> list[str]:
    """Remove a container's cgroup from every hierarchy, killing what still runs in it
    (after `delete`, nothing should). Returns the errors, empty when it is gone."""
    return Group.at(cgroups_path).destroy()


def _sweep_cgroups(cgroup_parent: str, errors: list[str]) -> list[str]:
    names: set[str] = set()
    for parent in cgroup_dirs(cgroup_parent):
        names.update(
            entry.name
            for entry in parent.iterdir()
            if entry.is_dir() and entry.name.startswith(CONTAINER_PREFIX)
        )
    removed = []
    for name in sorted(names):
        failed = Group.at(f"{cgroup_parent.strip('/')}/{name}").destroy()
        errors += failed
        if not failed:
            removed.append(name)
    return removed


def _quiet(argv: Sequence[str], timeout_s: float) -> None:
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=timeout_s,
            check=False,
        )


def _tail(data: bytes, limit: int = 400) -> str:
    return data.decode(errors="replace").strip()[-limit:]
