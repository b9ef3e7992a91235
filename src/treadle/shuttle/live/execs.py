"""The processes exec'd in one sandbox, kept on the node apart from the streams that follow
them.

A client that goes away (or whose Weaver link drops) does not end its process: the process
runs on, and what it writes meanwhile is kept here, up to `KEPT_BYTES` per process (the
oldest dropped first, and counted), so a client that attaches again, by pid or tag, reads it
before the live output. While a client follows a process, the process goes at the client's
pace (the agent stops reading its pipes while the stream's window is spent); while none
does, it never waits for anyone.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections import deque
from typing import Any

from treadle.shuttle.live.link import GuestProcess, ProcessExit

__all__ = ["KEPT_BYTES", "KEPT_ENDED", "Exec", "ExecTable"]

KEPT_BYTES = 1024 * 1024
# Ended processes remembered per sandbox (for a late attach, and the process list).
KEPT_ENDED = 16


class Exec:
    """One exec'd process: its output kept while nobody follows, and how it ended."""

    def __init__(
        self,
        process: GuestProcess,
        argv: list[str],
        tag: str | None,
        *,
        pty: bool,
        timeout_s: float | None,
    ) -> None:
        self.process = process
        self.pid = process.os_pid
        self.argv = argv
        self.tag = tag
        self.pty = pty
        self.started_at = time.time()
        self.kept: deque[tuple[str, bytes]] = deque()
        self.kept_bytes = 0
        self.dropped = 0
        self.follower: Any = None  # the stream relaying it now, if any
        self.over = asyncio.Event()
        self.exit: ProcessExit | None = None
        self.error: str | None = None
        self.timed_out = False
        self._timer = (
            None
            if timeout_s is None
            else asyncio.get_running_loop().call_later(timeout_s, self._expire)
        )

    @property
    def running(self) -> bool:
        return not self.over.is_set()

    def keep(self, channel: str, data: bytes) -> None:
        self.kept.append((channel, data))
        self.kept_bytes += len(data)
        while self.kept_bytes > KEPT_BYTES:
            _, old = self.kept.popleft()
            self.kept_bytes -= len(old)
            self.dropped += len(old)

    def peek(self, limit: int) -> tuple[str, bytes] | None:
        """The oldest kept output, up to `limit` bytes of it, left in place (`drop` it)."""
        if not self.kept:
            return None
        channel, data = self.kept[0]
        return channel, data[:limit]

    def drop(self, size: int) -> None:
        channel, data = self.kept[0]
        if size < len(data):
            self.kept[0] = (channel, data[size:])
        else:
            self.kept.popleft()
        self.kept_bytes -= min(size, len(data))

    def put_back_all(self, sent: deque[tuple[str, bytes]]) -> None:
        """Output sent to a client that may not have received it: first again, in order."""
        for channel, data in reversed(sent):
            self.kept.appendleft((channel, data))
            self.kept_bytes += len(data)
        sent.clear()
        while self.kept_bytes > KEPT_BYTES:
            _, old = self.kept.popleft()
            self.kept_bytes -= len(old)
            self.dropped += len(old)

    def ended(self, exit: ProcessExit | None, error: str | None) -> None:
        self.exit, self.error = exit, error
        if self._timer is not None:
            self._timer.cancel()
        self.over.set()

    def _expire(self) -> None:
        if self.running:
            self.timed_out = True
            self.process.signal(signal.SIGKILL)

    def view(self) -> dict[str, Any]:
        exit = self.exit
        return {
            "pid": self.pid,
            "tag": self.tag,
            "argv": self.argv,
            "pty": self.pty,
            "running": self.running,
            "exit_code": None if exit is None else exit.exit_code,
            "signal": None if exit is None else exit.signal,
            "timed_out": self.timed_out,
            "started_at": self.started_at,
        }


class ExecTable:
    """A sandbox's exec'd processes: the running ones, and the last few that ended."""

    def __init__(self) -> None:
        self._by_pid: dict[int, Exec] = {}
        self._order: list[Exec] = []

    def add(self, ex: Exec) -> None:
        self._order.append(ex)
        if ex.pid is not None:
            self._by_pid[ex.pid] = ex
        ended = [e for e in self._order if not e.running]
        for old in ended[: max(0, len(ended) - KEPT_ENDED)]:
            self._order.remove(old)
            if old.pid is not None and self._by_pid.get(old.pid) is old:
                del self._by_pid[old.pid]

    def find(self, pid: int | None, tag: str | None) -> Exec | None:
        """By pid; else the newest with `tag`, a running one before one that ended."""
        if pid is not None:
            return self._by_pid.get(pid)
        tagged = [e for e in self._order if e.tag == tag]
        running = [e for e in tagged if e.running]
        newest = running or tagged
        return newest[-1] if newest else None

    def running(self) -> int:
        return sum(1 for e in self._order if e.running)

    def views(self) -> list[dict[str, Any]]:
        return [e.view() for e in self._order]
