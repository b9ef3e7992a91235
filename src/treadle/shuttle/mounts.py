"""Size-limited work directories on the host: a tmpfs mounted over the directory.

The container tiers bind a host directory as the sandbox's `/work`; a plain directory would
let a program fill the host's disk. A tmpfs of the function's `disk_mib` bounds it, and its
pages are charged to the memory cgroup of whoever writes them (the sandbox). Mounting needs
CAP_SYS_ADMIN on the host: without it the directory stays unbounded and `mount_tmpfs` says
so, once, in the log.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
from pathlib import Path

__all__ = ["mount_tmpfs", "mounts_under", "unmount"]

log = logging.getLogger(__name__)

_MS_NOSUID = 2
_MS_NODEV = 4
_MNT_DETACH = 2
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_warned = False


def mount_tmpfs(path: Path, size_bytes: int, *, mode: int = 0o700) -> bool:
    """Mount a tmpfs of `size_bytes` over the directory `path`. False where this process may
    not mount (the directory is left as it was); other failures raise OSError."""
    global _warned
    options = f"size={max(size_bytes, 4096)},mode={mode:o}".encode()
    if _libc.mount(b"tmpfs", os.fsencode(path), b"tmpfs", _MS_NOSUID | _MS_NODEV, options) == 0:
        return True
    err = ctypes.get_errno()
    if err == errno.EPERM:
        if not _warned:
            _warned = True
            log.warning("cannot mount a tmpfs (no CAP_SYS_ADMIN): work dirs have no disk quota")
        return False
    raise OSError(err, f"cannot mount a tmpfs on {path}: {os.strerror(err)}")


def unmount(path: Path) -> None:
    """Detach the mount at `path`; nothing when nothing is mounted there."""
    if _libc.umount2(os.fsencode(path), _MNT_DETACH) != 0:
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOENT):
            raise OSError(err, f"cannot unmount {path}: {os.strerror(err)}")


def mounts_under(root: Path) -> list[Path]:
    """Mount points at or below `root` in this process's mount namespace, deepest first."""
    prefix = os.path.realpath(root)
    found: list[Path] = []
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return found
    for line in lines:
        fields = line.split(" ")
        if len(fields) < 5:
            continue
        point = _unescape(fields[4])
        if point == prefix or point.startswith(prefix + "/"):
            found.append(Path(point))
    return sorted(found, key=lambda p: len(p.parts), reverse=True)


def _unescape(field: str) -> str:
    # mountinfo writes space, tab, newline and backslash as octal escapes.
    out: list[str] = []
    i = 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)
