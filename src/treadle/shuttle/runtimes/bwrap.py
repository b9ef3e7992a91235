"""The sandbox of the namespace tier as bubblewrap sees it: its options, and what the program
finds in it.

The sandbox's file system, from its root:

- `/usr` and the host's top-level program directories (`/bin`, `/lib`, … as symlinks into
  /usr where the host has merged /usr), bound read-only: the host's programs, nothing else of
  the host. Shuttle's home, /root, /home and the host's /tmp are not there.
- `/etc`: a minimal passwd, group, hosts and nsswitch.conf of its own (`sandbox_etc/`), and
  from the host only what programs need to start (the dynamic linker's cache, alternatives,
  the time zone), read-only. With network, also the host's address selection and TLS trust
  files, and a resolv.conf given by Shuttle (the host's may name a resolver on the host's
  loopback, which the sandbox cannot reach).
- `/work`: the work dir (HOME, TMPDIR, cwd), a tmpfs holding `args.json` and the source, and
  `/tmp`: a private tmpfs. Each is limited to the function's `disk_mib`. Being tmpfs, what is
  written there is memory, charged to the attempt's memory limit too (which thus bounds
  all of them together), and gone with the sandbox: nothing of an attempt stays on the
  host's disk, and no quota support of the host's file system is needed.
- `/proc` of the sandbox's own PID namespace and a minimal `/dev`, read-only but for the
  devices themselves and `/dev/shm`, a tmpfs limited like /tmp.

The root and everything not listed above is read-only.

Every namespace is new, the network's included: with network or without, the sandbox has a
network namespace of its own, never the host's. Network is an interface that Shuttle adds to
that namespace before the program runs (`slirp`); these options only differ in /etc.
"""

from __future__ import annotations

import errno
import functools
import os
import posixpath
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from treadle.shuttle.sandbox.policy import WORK_DIR, masked_in_proc

__all__ = [
    "SANDBOX_ETC",
    "WORK_DIR",
    "Fds",
    "host_binds",
    "options",
    "read_only_binds",
    "resolve_in_sandbox",
    "sandbox_etc",
]

SANDBOX_ETC = Path(__file__).parent / "sandbox_etc"
_ROOT_DIRS = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")
_HOST_ETC = ("ld.so.cache", "alternatives", "localtime")
_NETWORK_ETC = ("gai.conf", "ssl", "ca-certificates", "ca-certificates.conf")
# Top-level names of the sandbox whose content is the host's, bound read-only.
_FROM_HOST = frozenset(("usr", *_ROOT_DIRS))
_HOSTNAME = "treadle"


@dataclass(frozen=True, slots=True)
class Fds:
    """The fds, as bubblewrap sees them, that carry its inputs."""

    seccomp: int
    files: Sequence[tuple[int, str, int]]  # (fd, name in the work dir, mode)
    info: int | None = None  # where bubblewrap reports the sandbox's pid
    # What the sandbox waits on, once created and before anything runs in it, for whoever
    # reads `info` to map its user namespace (which bubblewrap then leaves to them), and
    # again, once set up, right before it runs the program.
    block: int | None = None
    resolv_conf: int | None = None  # with network: the content of /etc/resolv.conf
    # the sandbox's own /etc files (`sandbox_etc()`): (fd, name)
    etc: Sequence[tuple[int, str]] = ()


def read_only_binds(binds: Iterable[tuple[Path, str]]) -> list[str]:
    """The options that show each host directory `source` read-only at `target`. The missing
    parents of `target` are made on the sandbox's own root, open to every user of the
    sandbox (bubblewrap would make them its user's alone, 0700)."""
    args: list[str] = []
    for source, target in binds:
        parent = posixpath.dirname(target.rstrip("/"))
        if parent not in ("", "/"):
            args += ["--perms", "0755", "--dir", parent]
        args += ["--ro-bind", str(source), target]
    return args


def host_binds(root: Path = Path("/")) -> list[str]:
    """The options that bring the host's programs into the sandbox, read-only."""
    args = ["--ro-bind", str(root / "usr"), "/usr"]
    for name in _ROOT_DIRS:
        path = root / name
        if path.is_symlink():
            args += ["--symlink", os.readlink(path), f"/{name}"]
        elif path.is_dir():
            args += ["--ro-bind", str(path), f"/{name}"]
    args += ["--perms", "0755", "--dir", "/etc"]
    for name in _HOST_ETC:
        path = root / "etc" / name
        if path.is_symlink():
            # As a link, not a bind of its target: a bind shows the target's host path in
            # the sandbox's mount table.
            args += ["--symlink", os.readlink(path), f"/etc/{name}"]
        else:
            args += ["--ro-bind-try", str(path), f"/etc/{name}"]
    return args


@functools.cache
def sandbox_etc() -> tuple[tuple[str, bytes], ...]:
    """The sandbox's own /etc files (name, content). They travel to bubblewrap as fds, not
    as paths: bubblewrap runs as the workload's unprivileged uid, which may not reach where
    treadle is installed."""
    return tuple((path.name, path.read_bytes()) for path in sorted(SANDBOX_ETC.iterdir()))


def options(
    *,
    binds: Sequence[str],
    fds: Fds,
    env: Mapping[str, str],
    disk_bytes: int,
    network: bool,
    etc: Path = Path("/etc"),
    capabilities: Sequence[str] = (),
    home: str = WORK_DIR,
) -> list[str]:
    """bubblewrap's options for one attempt (everything but the command). With `network`,
    `fds.resolv_conf` is required. `capabilities`: what the program keeps (in its user
    namespace), where it is not to be left with none. `home`: where its work dir is."""
    if network and fds.resolv_conf is None:
        raise ValueError("a sandbox with network needs its resolv.conf")
    # A user namespace even where bubblewrap could do without (run by root).
    args = [
        "--unshare-all",
        "--unshare-user",
        "--die-with-parent",
        "--new-session",
        "--cap-drop",
        "ALL",
        *(option for name in capabilities for option in ("--cap-add", name)),
        "--hostname",
        _HOSTNAME,
        "--clearenv",
        *binds,
    ]
    if network:
        for name in _NETWORK_ETC:
            args += ["--ro-bind-try", str(etc / name), f"/etc/{name}"]
        args += ["--perms", "0644", "--file", str(fds.resolv_conf), "/etc/resolv.conf"]
    size = str(disk_bytes)
    args += [
        "--proc",
        "/proc",
        *_proc_masks(),
        "--dev",
        "/dev",
        # POSIX shared memory and semaphores need a writable /dev/shm; the rest of /dev is
        # bubblewrap's own tmpfs, which would otherwise take files of any size.
        "--perms",
        "1777",
        "--size",
        size,
        "--tmpfs",
        "/dev/shm",
        "--remount-ro",
        "/dev",
        "--perms",
        "1777",
        "--size",
        size,
        "--tmpfs",
        "/tmp",
        "--perms",
        "0700",
        "--size",
        size,
        "--tmpfs",
        home,
    ]
    for fd, name in fds.etc:
        args += ["--perms", "0644", "--file", str(fd), f"/etc/{name}"]
    for fd, name, mode in fds.files:
        args += ["--perms", f"{mode:04o}", "--file", str(fd), f"{home}/{name}"]
    # Last of the file system: everything created above on the root (mount points, /etc)
    # turns read-only.
    args += ["--remount-ro", "/", "--chdir", home]
    for key, value in env.items():
        if not key or "=" in key:
            raise ValueError(f"invalid environment variable name {key!r}")
        args += ["--setenv", key, value]
    args += ["--seccomp", str(fds.seccomp)]
    if fds.info is not None:
        args += ["--info-fd", str(fds.info)]
    if fds.block is not None:
        # The same fd twice: bubblewrap's outer process waits on it (--userns-block-fd) for
        # one byte but leaves it open in the sandbox; --block-fd has the sandbox, once set up,
        # wait for a second byte or the end of the pipe, and close it before the program
        # runs (a second pipe would stay open in the program).
        args += ["--userns-block-fd", str(fds.block), "--block-fd", str(fds.block)]
    _check_no_nul(args)
    return args


@functools.cache
def _proc_masks() -> tuple[str, ...]:
    """Options that show the sandbox's /proc without the host-wide entries the sandbox layer
    masks (`policy.MASKED_PATHS`): a file reads as empty, a directory as an empty read-only
    one. Only entries this kernel has: bubblewrap cannot mount over what is not there."""
    args: list[str] = []
    for path in masked_in_proc():
        if os.path.isdir(path):
            args += ["--perms", "0555", "--tmpfs", path, "--remount-ro", path]
        elif os.path.exists(path):
            args += ["--ro-bind", "/dev/null", path]
    return tuple(args)


def _check_no_nul(args: Iterable[str]) -> None:
    # The options travel NUL-separated (--args): a NUL inside a value would smuggle in an
    # option of its own, such as a bind of the host's root.
    if any("\0" in arg for arg in args):
        raise ValueError("embedded null byte in an argument or environment variable")


def resolve_in_sandbox(
    name: str,
    path: str,
    work_files: Mapping[str, int],
    binds: Mapping[str, Path] | None = None,
) -> str:
    """Where execvp inside the sandbox would find `name` (searching `path`, from the work
    dir), given the work dir's files and their modes, and the host directories bound into
    the sandbox (`binds`: mount point -> host directory); raises as execvp would fail.
    Checking here lets a missing program end as "spawn_failed" rather than as an exit code
    that the program could have returned itself."""
    if "/" in name:
        candidates = [posixpath.normpath(posixpath.join(WORK_DIR, name))]
    else:
        candidates = [
            posixpath.normpath(posixpath.join(WORK_DIR, directory or ".", name))
            for directory in path.split(":")
        ]
    denied = False
    for candidate in candidates:
        found = _executable(candidate, work_files, binds or {})
        if found:
            return candidate
        denied = denied or found is False
    if denied:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), name)
    if "/" in name:
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), name)
    raise FileNotFoundError(errno.ENOENT, f"command not found (PATH={path})", name)


def _executable(path: str, work_files: Mapping[str, int], binds: Mapping[str, Path]) -> bool | None:
    """True: an executable file; False: a file that cannot be executed; None: no file."""
    if path.startswith(WORK_DIR + "/"):
        mode = work_files.get(path[len(WORK_DIR) + 1 :])
        return None if mode is None else bool(mode & 0o111)
    for target, source in binds.items():
        if path.startswith(target + "/"):
            return _host_executable(f"{source}{path[len(target) :]}")
    if path.split("/")[1] not in _FROM_HOST:
        return None
    return _host_executable(path)


def _host_executable(path: str) -> bool | None:
    if not os.path.isfile(path):
        return None
    return os.access(path, os.X_OK)
