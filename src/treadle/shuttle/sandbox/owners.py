"""Which Shuttle process owns a group, told without a pid.

The name of a workload's cgroup shows inside its sandbox (`/proc/self/cgroup`). A name made of
Shuttle's pid and a counter told every tenant how busy the node was; so a name carries this
process's opaque token (and a random part) instead. The token is a file that this process
holds locked for as long as it lives (`flock`, released by the kernel however the process
ends): a group whose token's file is not locked belongs to a Shuttle that is gone, and the
sweep at start removes it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import secrets
import threading
from pathlib import Path

from treadle.shuttle.sandbox.state import private_dir, state_root

__all__ = ["is_gone", "token", "tokens_dir"]

_TOKEN = re.compile(r"[0-9a-f]{12}")
_lock = threading.Lock()
_mine: tuple[str, int] | None = None


def tokens_dir() -> Path:
    return private_dir(state_root() / "owners", 0o700)


def token() -> str:
    """This process's token, claimed (and locked) on first use."""
    global _mine
    with _lock:
        if _mine is None:
            directory = tokens_dir()
            value = secrets.token_hex(6)
            fd = os.open(directory / value, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX)
            _mine = (value, fd)
        return _mine[0]


def is_gone(value: str) -> bool:
    """Whether the process that claimed `value` has ended (then its file is removed)."""
    if not _TOKEN.fullmatch(value):
        return False  # not a token: nobody's to sweep
    if _mine is not None and value == _mine[0]:
        return False
    path = tokens_dir() / value
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return False
        raise
    finally:
        os.close(fd)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    return True
