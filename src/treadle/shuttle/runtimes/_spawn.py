"""Starting a program without forking Python.

The process tier needs what `subprocess` cannot give cheaply: the result pipe at exactly fd 3
(`pass_fds` keeps the parent's number; `preexec_fn` forks the whole interpreter, ~3x slower
and unsafe with threads), a working directory, and a new session. glibc's and musl's
`posix_spawn` do all of it in one vfork-style call, reporting exec failures (ENOENT, EACCES)
synchronously, so this module drives it through ctypes.

Starting a program as another user (a sandbox's own host ids, where Shuttle is root) costs no
helper either: see `_AsIdentity`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import fcntl
import os
import platform
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

__all__ = [
    "identity_unsupported_reason",
    "resolve_program",
    "spawn",
    "spawn_async",
    "unsupported_reason",
]

# Flag values shared by glibc and musl (spawn.h).
_SETSIGDEF = 0x04
_SETSIGMASK = 0x08
_SETSID = 0x80
# Opaque libc structures, over-allocated: glibc needs 80 (file actions), 336 (attributes) and
# 128 (sigset) bytes on 64-bit targets, musl less.
_FILE_ACTIONS_SIZE = 256
_ATTR_SIZE = 1024
_SIGSET_SIZE = 256


class _PosixSpawn:
    def __init__(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self._spawn = self._fn(
            libc,
            "posix_spawn",
            ctypes.c_void_p,
            ctypes.c_char_p,
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_void_p,
        )
        self._fa_init = self._fn(libc, "posix_spawn_file_actions_init", ctypes.c_void_p)
        self._fa_destroy = self._fn(libc, "posix_spawn_file_actions_destroy", ctypes.c_void_p)
        self._fa_dup2 = self._fn(
            libc, "posix_spawn_file_actions_adddup2", ctypes.c_void_p, ctypes.c_int, ctypes.c_int
        )
        self._fa_chdir = self._fn(
            libc, "posix_spawn_file_actions_addchdir_np", ctypes.c_void_p, ctypes.c_char_p
        )
        # Optional (glibc >= 2.34): belt and braces against inheritable fds leaked by C code.
        self._fa_closefrom = (
            self._fn(
                libc, "posix_spawn_file_actions_addclosefrom_np", ctypes.c_void_p, ctypes.c_int
            )
            if hasattr(libc, "posix_spawn_file_actions_addclosefrom_np")
            else None
        )
        # One attribute set serves every spawn: new session, empty signal mask, and SIGPIPE /
        # SIGXFSZ back to default (Python ignores them, and ignored dispositions survive exec).
        self._attr = ctypes.create_string_buffer(_ATTR_SIZE)
        self._check(self._fn(libc, "posix_spawnattr_init", ctypes.c_void_p)(self._attr))
        empty = ctypes.create_string_buffer(_SIGSET_SIZE)
        defaults = ctypes.create_string_buffer(_SIGSET_SIZE)
        sigemptyset = self._fn(libc, "sigemptyset", ctypes.c_void_p)
        sigaddset = self._fn(libc, "sigaddset", ctypes.c_void_p, ctypes.c_int)
        self._check(sigemptyset(empty))
        self._check(sigemptyset(defaults))
        for sig in (signal.SIGPIPE, signal.SIGXFSZ):
            self._check(sigaddset(defaults, int(sig)))
        setflags = self._fn(libc, "posix_spawnattr_setflags", ctypes.c_void_p, ctypes.c_short)
        self._check(setflags(self._attr, _SETSID | _SETSIGMASK | _SETSIGDEF))
        self._check(
            self._fn(libc, "posix_spawnattr_setsigmask", ctypes.c_void_p, ctypes.c_void_p)(
                self._attr, empty
            )
        )
        self._check(
            self._fn(libc, "posix_spawnattr_setsigdefault", ctypes.c_void_p, ctypes.c_void_p)(
                self._attr, defaults
            )
        )

    @staticmethod
    def _fn(libc: ctypes.CDLL, name: str, *argtypes: Any) -> Any:
        fn = getattr(libc, name)
        fn.argtypes = list(argtypes)
        fn.restype = ctypes.c_int
        return fn

    @staticmethod
    def _check(rc: int) -> None:
        # posix_spawn* return the error number; sig*set return -1 and set errno.
        if rc == -1:
            rc = ctypes.get_errno()
        if rc:
            raise OSError(rc, os.strerror(rc))

    def __call__(
        self,
        program: str,
        argv: Sequence[str],
        env: Mapping[str, str],
        cwd: Path,
        fds: Mapping[int, int],
    ) -> int:
        c_argv = _cstrings(argv)
        c_env = _cstrings(f"{key}={value}" for key, value in env.items())
        top = max(fds) + 1
        moved: list[int] = []
        actions = ctypes.create_string_buffer(_FILE_ACTIONS_SIZE)
        self._check(self._fa_init(actions))
        try:
            for target, source in sorted(fds.items()):
                # A source below `top` could be overwritten by an earlier dup2 in the child
                # (a daemonized parent may get its pipes at fd 0..3): lift it out of the way.
                if source < top:
                    source = fcntl.fcntl(source, fcntl.F_DUPFD_CLOEXEC, top)
                    moved.append(source)
                self._check(self._fa_dup2(actions, source, target))
            self._check(self._fa_chdir(actions, os.fsencode(cwd)))
            if self._fa_closefrom is not None:
                self._check(self._fa_closefrom(actions, top))
            pid = ctypes.c_int()
            rc = self._spawn(
                ctypes.byref(pid), os.fsencode(program), actions, self._attr, c_argv, c_env
            )
            if rc:
                raise OSError(rc, os.strerror(rc), program)
            return pid.value
        finally:
            self._fa_destroy(actions)
            for fd in moved:
                os.close(fd)


def _cstrings(items: Any) -> Any:
    encoded = [os.fsencode(item) for item in items]
    if any(b"\0" in item for item in encoded):
        raise ValueError("embedded null byte in an argument or environment variable")
    return (ctypes.c_char_p * (len(encoded) + 1))(*encoded, None)


# (setgroups, setresgid, setresuid) by machine: asm/unistd_64.h, asm-generic/unistd.h.
_CREDENTIAL_CALLS = {
    "x86_64": (116, 119, 117),
    "amd64": (116, 119, 117),
    "aarch64": (159, 149, 147),
    "arm64": (159, 149, 147),
}


class _AsIdentity:
    """Starts programs as another user and group, with no supplementary groups, without an
    exec of a helper such as `setpriv` (measured: ~1 ms of CPU per start, a sixth of what a
    whole namespace sandbox costs).

    Linux keeps credentials per thread; glibc's setresuid() changes every thread of the
    process, the raw system call only its caller. So one thread of Shuttle's, kept for this
    alone, takes the workload's ids for the length of one posix_spawn and then takes its own
    back, which its saved uid (left as root's) allows. The child, made by that thread, starts
    with the workload's ids, and its exec, by a process whose ids are all unprivileged, drops
    the capabilities the saved uid kept. The thread lives as long as Shuttle: a child's
    parent-death signal (bubblewrap's --die-with-parent) watches the thread that made it.
    Changing the effective uid also makes Shuttle's memory non-dumpable, for good, so no
    process of a workload's uid can ptrace or read Shuttle through /proc."""

    def __init__(self, calls: tuple[int, int, int]) -> None:
        self._setgroups, self._setresgid, self._setresuid = calls
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._libc.syscall.restype = ctypes.c_long
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spawn-as")
        self._broken: str | None = None

    def submit(self, uid: int, gid: int, start: Callable[[], int]) -> Future[int]:
        if uid <= 0 or gid <= 0:
            raise ValueError(f"not an unprivileged identity: uid {uid}, gid {gid}")
        return self._thread.submit(self._as, uid, gid, start)

    def _as(self, uid: int, gid: int, start: Callable[[], int]) -> int:
        if self._broken is not None:
            raise OSError(errno.EPERM, self._broken)
        own_uid, own_gid = os.getresuid(), os.getresgid()
        self._call(self._setgroups, 0, None)
        self._call(self._setresgid, gid, gid, own_gid[2])
        try:
            self._call(self._setresuid, uid, uid, own_uid[2])
            try:
                return start()
            finally:
                self._restore(self._setresuid, *own_uid)
        finally:
            self._restore(self._setresgid, *own_gid)

    def _restore(self, number: int, *ids: int) -> None:
        try:
            self._call(number, *ids)
        except OSError as exc:
            # Never start anything from a thread whose identity is not known.
            self._broken = f"the spawning thread could not take its identity back: {exc}"
            raise

    def _call(self, number: int, *args: Any) -> None:
        if self._libc.syscall(number, *args) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))


def _load_identity() -> tuple[_AsIdentity | None, str | None]:
    calls = _CREDENTIAL_CALLS.get(platform.machine().lower())
    if calls is None:
        return None, f"starting programs as another user is not done on {platform.machine()}"
    return _AsIdentity(calls), None


def _load() -> tuple[_PosixSpawn | None, str | None]:
    if not sys.platform.startswith("linux"):
        return None, f"the process runtime needs Linux (this is {sys.platform})"
    if not hasattr(os, "pidfd_open"):
        return None, "the process runtime needs pidfd_open (Linux 5.3+, Python 3.9+)"
    try:
        return _PosixSpawn(), None
    except (OSError, AttributeError) as exc:
        return None, f"the process runtime needs posix_spawn with addchdir_np in libc: {exc}"


_spawner, _unsupported = _load()
_as_identity, _identity_unsupported = _load_identity()


def unsupported_reason() -> str | None:
    """Why programs cannot be spawned on this host, or None when they can."""
    return _unsupported


def identity_unsupported_reason() -> str | None:
    """Why `spawn` cannot start programs as another user here, or None when it can."""
    if _unsupported is not None:
        return _unsupported
    if _identity_unsupported is not None:
        return _identity_unsupported
    if os.geteuid() != 0:
        return "only root starts programs as another user"
    return None


def resolve_program(name: str, path: str, cwd: Path) -> str:
    """Find `name` the way execvp would, but in the child's PATH rather than Shuttle's (libc's
    posix_spawnp searches the caller's). Names with a slash are relative to `cwd`."""
    if "/" in name:
        return name
    for directory in path.split(":"):
        candidate = cwd / (directory or ".") / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    raise FileNotFoundError(errno.ENOENT, f"command not found (PATH={path})", name)


def spawn(
    program: str,
    argv: Sequence[str],
    env: Mapping[str, str],
    cwd: Path,
    fds: Mapping[int, int],
    *,
    ids: tuple[int, int] | None = None,
) -> int:
    """Start `program` in a new session with `cwd` and exactly `env`; `fds` maps each child
    fd to the parent fd it gets, and every other fd is closed. With `ids` (uid, gid), it
    starts as that user and group, with no supplementary groups (see
    `identity_unsupported_reason`). Returns the pid; the caller must reap it. Raises OSError
    when the program cannot be executed."""
    spawner = _spawner
    if spawner is None:
        raise OSError(errno.ENOSYS, _unsupported or "spawning is not supported here")
    if ids is None:
        return spawner(program, argv, env, cwd, fds)
    return _identity().submit(*ids, lambda: spawner(program, argv, env, cwd, fds)).result()


async def spawn_async(
    program: str,
    argv: Sequence[str],
    env: Mapping[str, str],
    cwd: Path,
    fds: Mapping[int, int],
    *,
    ids: tuple[int, int] | None = None,
) -> int:
    """`spawn` for an event loop. With `ids` the loop goes on while the child starts (the
    exec that posix_spawn waits for takes a millisecond or more for bubblewrap). `fds` stay
    the caller's to close once this returns or raises; a child started for a caller that was
    cancelled meanwhile is killed."""
    spawner = _spawner
    if ids is None or spawner is None:
        return spawn(program, argv, env, cwd, fds, ids=ids)
    future = asyncio.wrap_future(
        _identity().submit(*ids, lambda: spawner(program, argv, env, cwd, fds))
    )
    cancelled = False
    while not future.done():
        try:
            await asyncio.wait([future])  # never cancels `future`, never raises its error
        except asyncio.CancelledError:
            # Until posix_spawn is done the caller must not close `fds`: a number it closed
            # and something else reopened would reach the child.
            cancelled = True
    if not cancelled:
        return future.result()
    if future.exception() is None:
        # Reaped with the orphans (`treadle.shuttle.reaper`): it is in a session of its own.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(future.result(), signal.SIGKILL)
    raise asyncio.CancelledError


def _identity() -> _AsIdentity:
    reason = identity_unsupported_reason()
    if reason is not None or _as_identity is None:
        raise OSError(errno.EPERM, reason)
    return _as_identity
