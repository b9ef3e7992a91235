"""How a sandboxed program ended, read one way for every tier: the reasons an exit report may
carry, and what a tool's exit code and the sandbox's counters say.

Reasons (`ExitStatus.reason`, and the execution's `error` once Weaver has it): None for a
normal exit whatever its code; "timeout" and "cancelled" when Shuttle killed it;
"spawn_failed" when the program could not be started; "oom_killed" when it failed after its
memory limit had a process of it killed; "pids_limit" when it failed after its process
limit refused a fork; "killed:SIGNAME" when a signal Shuttle did not send ended it.

The sandbox tools (bubblewrap, crun, runc, runsc) report the program's death by signal N as
exit code 128 + N, as shells do; that is read as the signal (exit code -N), so a program that
itself exits with 129-192 is reported as killed by that signal. The counters then tell an
OOM kill or a refused fork apart from the rest.
"""

from __future__ import annotations

import signal

__all__ = [
    "CANCELLED",
    "OOM_KILLED",
    "PIDS_LIMIT",
    "SPAWN_FAILED",
    "TIMEOUT",
    "classify",
    "killed_by",
    "signal_name",
]

TIMEOUT = "timeout"
CANCELLED = "cancelled"
SPAWN_FAILED = "spawn_failed"
OOM_KILLED = "oom_killed"
PIDS_LIMIT = "pids_limit"

_SIGNALS = {int(s) for s in signal.Signals}


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"SIG{number}"


def killed_by(number: int) -> str:
    return f"killed:{signal_name(number)}"


def classify(
    exit_code: int | None, reason: str | None, *, oom_killed: bool, pids_denied: bool
) -> tuple[int | None, str | None]:
    """(exit code, reason) of a program run through a sandbox tool, from the tool's exit code,
    the reason Shuttle already knows (it killed the program, or could not start it: kept as
    it is) and the sandbox's counters (its memory limit killed a process; its process limit
    refused a fork)."""
    if reason is not None:
        return exit_code, reason
    if exit_code is None:
        return None, SPAWN_FAILED
    if exit_code > 128 and exit_code - 128 in _SIGNALS:
        exit_code = 128 - exit_code
    if exit_code == 0:
        return 0, None
    if oom_killed:
        return exit_code, OOM_KILLED
    if pids_denied:
        return exit_code, PIDS_LIMIT
    if exit_code < 0:
        return exit_code, killed_by(-exit_code)
    return exit_code, None
