"""Starting a program without forking Python.

The process tier needs what `subprocess` cannot give cheaply: the result pipe at exactly fd 3
(`pass_fds` keeps the parent's number; `preexec_fn` forks the whole interpreter, ~3x slower
and unsafe with threads), a working directory, and a new session. glibc's and musl's
`posix_spawn` do all of it in one vfork-style call, reporting exec failures (ENOENT, EACCES)
synchronously, so this module drives it through ctypes.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import signal
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["resolve_program", "spawn", "unsupported_reason"]

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


def unsupported_reason() -> str | None:
    """Why programs cannot be spawned on this host, or None when they can."""
    return _unsupported


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
) -> int:
    """Start `program` in a new session with `cwd` and exactly `env`; `fds` maps each child
    fd to the parent fd it gets, and every other fd is closed. Returns the pid; the caller
    must reap it. Raises OSError when the program cannot be executed."""
    if _spawner is None:
        raise OSError(errno.ENOSYS, _unsupported or "spawning is not supported here")
    return _spawner(program, argv, env, cwd, fds)
