"""Helpers for the suites that run programs through isolation runtimes.

What runs in a sandbox sees neither the test's files nor its pids, and the test does not see
the sandbox's pids. So the test finds the processes of a program by an argument that only they
carry (`tag()`), in its own /proc, and reaches into a program's work dir through
`/proc/<pid>/cwd`, which works whatever mount namespace the program is in.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from treadle.domain.resources import Resources, Tier
from treadle.protocol.messages import AssignSpec
from treadle.shuttle.runtimes import ExitStatus, Runtime, RuntimeHandle, Stream
from treadle.shuttle.settings import ShuttleSettings

PY = "/usr/bin/python3"  # not the PATH `python3`, which may be a slow pyenv shim


def shuttle_settings(home: Path, **overrides: Any) -> ShuttleSettings:
    fields: dict[str, Any] = {
        "weaver_url": "http://127.0.0.1:9",
        "home": home,
        "allow_process_runtime": True,
        "token": None,
    }
    fields.update(overrides)
    return ShuttleSettings(**fields)


def spec(argv: list[str], **overrides: Any) -> AssignSpec:
    fields: dict[str, Any] = {
        "id": "ex_1",
        "attempt": 1,
        "tenant_id": "tn_1",
        "function": "fn",
        "version": 1,
        "argv": argv,
        "timeout_s": 30,
        "resources": Resources(),
        "isolation": Tier.PROCESS,
    }
    fields.update(overrides)
    return AssignSpec(**fields)


def tag() -> str:
    """An argument to give a program so that its processes can be found (`pids_with`)."""
    return f"treadle-test-{uuid.uuid4().hex}"


def pids_with(argument: str) -> list[int]:
    """The pids, in this process's PID namespace, of processes with `argument` in argv."""
    wanted = argument.encode()
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if wanted in argv:
            found.append(int(name))
    return found


async def wait_ended(pid: int) -> bool:
    """Whether `pid` ends within 10 s (a pidfd turns readable when its process ends)."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        ready, _, _ = await asyncio.to_thread(select.select, [pidfd], [], [], 10)
        return bool(ready)
    finally:
        os.close(pidfd)


# The program side of a gate: `wait()` returns once per `Gate.release()`. The program makes
# the FIFO in its work dir before its first output, and holds it open for writing itself so
# that reading blocks until the test writes rather than ending at once.
GATED = """
import json, os, sys
os.mkfifo("gate")
gate = os.open("gate", os.O_RDWR)
def wait():
    os.read(gate, 1)
"""


class Gate:
    """Steps a GATED program run with `[..., gate.tag]` in its argv."""

    def __init__(self) -> None:
        self.tag = tag()
        self._fd: int | None = None

    def release(self) -> None:
        if self._fd is None:
            self._fd = self._open()
        os.write(self._fd, b"x")

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _open(self) -> int:
        for pid in pids_with(self.tag):
            # Other processes carry the tag too (a sandbox tool's own); only the program's
            # work dir has the gate.
            with contextlib.suppress(OSError):
                # Read-write: a release after the program has gone must not fail (EPIPE).
                return os.open(f"/proc/{pid}/cwd/gate", os.O_RDWR | os.O_NONBLOCK)
        if not pids_with(self.tag):
            # gVisor: the program's processes live in the sandbox's kernel, not the host's.
            pytest.skip("the program's processes are not host processes: no gate to reach")
        raise AssertionError("the program's gate is nowhere to be found")


@dataclass
class Run:
    output: list[tuple[Stream, bytes]]
    status: ExitStatus

    def text(self, stream: str) -> str:
        return b"".join(data for s, data in self.output if s == stream).decode()


async def run(runtime: Runtime, s: AssignSpec, workdir: Path) -> Run:
    async with asyncio.timeout(20):
        handle = await runtime.start(s, workdir)
        output = [item async for item in handle.output()]
        return Run(output, await handle.wait())


@contextlib.asynccontextmanager
async def started(runtime: Runtime, s: AssignSpec, workdir: Path) -> AsyncIterator[RuntimeHandle]:
    async with asyncio.timeout(20):
        handle = await runtime.start(s, workdir)
        try:
            yield handle
        finally:
            handle.kill()
            async for _ in handle.output():
                pass
            await handle.wait()
