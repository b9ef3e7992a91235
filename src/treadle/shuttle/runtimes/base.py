"""The isolation runtime interface (DESIGN §4). Every tier implements it and passes the same
contract suite (tests/contract/test_runtime_contract.py).

Life of an attempt, as Shuttle drives it::

    handle = await runtime.start(spec, workdir)   # never raises for a program that cannot
                                                  # start: the handle reports "spawn_failed"
    async for stream, data in handle.output():    # raw bytes in order of reading; ends after
        ...                                       # exit, once the pipes are drained
    status = await handle.wait()                  # exit code, reason, result, usage
    handle.kill()                                 # any time: SIGKILL the whole tree

Output is pulled, not pushed: a consumer that stops iterating applies backpressure (the
runtime stops reading, the program blocks on write) and nothing is dropped. Consume the
output concurrently with `wait()`; a program whose output nobody reads may never exit.
"""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from treadle.domain.resources import Tier
from treadle.protocol.messages import AssignSpec, Usage
from treadle.shuttle.sandbox.cgroups import GroupUsage

__all__ = ["ExitStatus", "Runtime", "RuntimeHandle", "SpawnFailed", "Stream"]

Stream = Literal["stdout", "stderr"]


@dataclass(frozen=True, slots=True)
class ExitStatus:
    """How an attempt ended, as the node observed it.

    `reason` is None for a normal exit (whatever the code), "timeout" or "cancelled" when
    Shuttle killed it, "killed:SIGNAME" when a signal it did not send ended it, and
    "spawn_failed" (with `exit_code` None) when the program could not be started. Tiers
    that enforce limits say "oom_killed" when the program failed because its memory limit
    had a process of it killed, and "pids_limit" when it failed after its process limit
    refused a fork. `exit_code` is negative (-signal) for a process ended by a signal.
    """

    exit_code: int | None
    reason: str | None = None
    result: Any = None
    usage: Usage = field(default_factory=Usage)
    # The last read of its counters (cgroup, network), where its tier keeps them: what it
    # used in all, for its last usage record.
    counters: GroupUsage | None = None


class RuntimeHandle(Protocol):
    def output(self) -> AsyncIterator[tuple[Stream, bytes]]:
        """The program's output; iterate it once."""
        ...

    async def wait(self) -> ExitStatus:
        """The exit status, once the program exited and its output is drained. Cancelling
        the caller does not affect the program."""
        ...

    def kill(self) -> None:
        """Kill the whole tree now; the exit is then reported with reason "cancelled".
        No effect once the program has exited."""
        ...


class Runtime(Protocol):
    @property
    def tier(self) -> Tier: ...

    async def start(self, spec: AssignSpec, workdir: Path) -> RuntimeHandle:
        """Start `spec` with `workdir` (created here, removed after exit) as its home; a
        tier that keeps the work dir inside its sandbox leaves `workdir` unused. Raises only
        for faults of this node (e.g. the disk is full), never for faults of the program;
        those end up in the handle's exit status and stderr."""
        ...


class SpawnFailed:
    """The handle of a program that could not be started: its only output is why."""

    def __init__(self, message: str) -> None:
        self._output: deque[tuple[Stream, bytes]] = deque([("stderr", message.encode())])

    def output(self) -> SpawnFailed:
        return self

    def __aiter__(self) -> SpawnFailed:
        return self

    async def __anext__(self) -> tuple[Stream, bytes]:
        if not self._output:
            raise StopAsyncIteration
        return self._output.popleft()

    async def wait(self) -> ExitStatus:
        return ExitStatus(exit_code=None, reason="spawn_failed")

    def kill(self) -> None:
        pass
