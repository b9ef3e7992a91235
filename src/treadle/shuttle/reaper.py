"""Orphans: processes that outlive the execution that started them.

Shuttle makes itself a child subreaper, so the orphans of its executions are re-parented to
it rather than to PID 1 (which, on some hosts, reaps lazily and leaves zombies for minutes),
and reaps them itself. It must never call `waitpid(-1)`: that would steal exit statuses from
whoever spawned a child on purpose. So it only reaps zombies that are

- its own children (re-parented orphans are),
- not processes Shuttle spawned and waits for itself (`track`/`untrack`), and
- not in Shuttle's own session: executions run in sessions of their own, so anything in
  Shuttle's session was started by this process on purpose (a library, `subprocess.run`)
  and its spawner will reap it.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import sys

__all__ = ["become_subreaper", "reap_orphans", "track", "untrack"]

log = logging.getLogger(__name__)

_PR_SET_CHILD_SUBREAPER = 36
_tracked: set[int] = set()
_subreaper = False


def track(pid: int) -> None:
    """`pid` is a child whose spawner reaps it: never touch it here."""
    _tracked.add(pid)


def untrack(pid: int) -> None:
    _tracked.discard(pid)


def become_subreaper() -> bool:
    """Idempotent; False where the OS has no such thing (then orphans go to PID 1)."""
    global _subreaper
    if _subreaper:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        ok = bool(libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        ok = False
    if not ok:
        log.warning("cannot become a child subreaper: orphans of executions go to PID 1")
    _subreaper = ok
    return ok


def alive(pid: int) -> bool:
    """Whether a process `pid` exists (one of another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def reap_orphans() -> list[int]:
    """Reap zombie orphans now; returns their pids. Costs one read per child of Shuttle."""
    me = os.getpid()
    my_session = os.getsid(0)
    reaped = []
    for pid in _children(me):
        if pid in _tracked:
            continue
        stat = _stat(pid)
        if stat is None:
            continue
        state, ppid, session = stat
        if state != "Z" or ppid != me or session == my_session:
            continue
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
            reaped.append(pid)
    return reaped


def _children(me: int) -> list[int]:
    # /proc/<pid>/task/<tid>/children is exact and cheap, but needs CONFIG_PROC_CHILDREN;
    # without it, fall back to scanning every process.
    pids: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{me}/task"):
            with open(f"/proc/{me}/task/{tid}/children", "rb") as f:
                pids.extend(int(p) for p in f.read().split())
        return pids
    except FileNotFoundError:
        pass
    except OSError:
        return []
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, session) of `pid`, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    # The command name sits in parentheses and may itself contain spaces or ")".
    fields = raw[raw.rfind(b")") + 2 :].split()
    try:
        return fields[0].decode(), int(fields[1]), int(fields[3])
    except (IndexError, ValueError):
        return None
