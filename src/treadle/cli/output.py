"""What the CLI writes: execution output, JSON, errors, and the exit code of an execution."""

from __future__ import annotations

import json
import signal
import sys
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from treadle.client.errors import TreadleClientError

__all__ = [
    "EXIT_CANCELLED",
    "EXIT_FAILURE",
    "EXIT_TIMEOUT",
    "ChunkWriter",
    "discard_chunk",
    "exit_code_for",
    "print_error",
    "print_json",
    "write_chunk",
    "write_output",
]

# The codes shells and `timeout(1)` use, so scripts can tell the endings apart.
EXIT_FAILURE = 1
EXIT_TIMEOUT = 124
EXIT_CANCELLED = 130  # 128 + SIGINT, what an interrupted command exits with
_SIGNAL_BASE = 128

ChunkWriter = Callable[[str, str], None]
"""Receives `(stream, data)` for each piece of output; stream is "stdout" or "stderr"."""


def exit_code_for(execution: Mapping[str, Any]) -> int:
    """The exit code `treadle invoke` and `treadle logs -f` end with for a finished execution.

    0 on success, 124 on timeout, 130 when cancelled; on failure the process's own exit code,
    128 + N when signal N killed it (as shells report it), and 1 when there is neither.
    """
    state = execution.get("state")
    if state == "success":
        return 0
    if state == "timeout":
        return EXIT_TIMEOUT
    if state == "cancelled":
        return EXIT_CANCELLED
    if state != "failure":
        raise ValueError(f"the execution has not finished (state {state!r})")
    code = execution.get("exit_code")
    if isinstance(code, int) and not isinstance(code, bool):
        if 0 < code < 256:
            return code
        if -64 < code < 0:  # the subprocess convention for "killed by signal -code"
            return _SIGNAL_BASE - code
    error = execution.get("error")
    if isinstance(error, str) and error.startswith("killed:"):
        try:
            return _SIGNAL_BASE + signal.Signals[error.removeprefix("killed:")].value
        except KeyError:
            pass
    return EXIT_FAILURE


def write_chunk(stream: str, data: str) -> None:
    """Write one chunk to our own stdout or stderr at once, so output appears live."""
    target = sys.stderr if stream == "stderr" else sys.stdout
    target.write(data)
    target.flush()


def discard_chunk(stream: str, data: str) -> None:
    """A ChunkWriter for when only the final execution is wanted (`--json`)."""


def write_output(output: Mapping[str, Any], write: ChunkWriter = write_chunk) -> None:
    """Write an `/output` answer: its stdout, then its stderr."""
    for stream in ("stdout", "stderr"):
        data = output.get(stream)
        if isinstance(data, str) and data:
            write(stream, data)


def print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def print_error(exc: TreadleClientError) -> None:
    """`error: <message>` in red on stderr, then the fields a validation error names."""
    from rich.console import Console
    from rich.markup import escape

    console = Console(stderr=True, highlight=False, soft_wrap=True)
    console.print(f"[bold red]error:[/] {escape(exc.message)}")
    for line in _detail_lines(exc.details):
        console.print(f"  {escape(line)}", style="red")


def _detail_lines(details: Any) -> list[str]:
    # Validation errors carry [{"loc": [...], "msg": ...}]; that is the one shape worth
    # spelling out. Anything else is shown compactly rather than dropped.
    if details is None or details == [] or details == {}:
        return []
    if isinstance(details, list) and all(isinstance(d, dict) and "msg" in d for d in details):
        lines = []
        for detail in details:
            loc = ".".join(str(part) for part in detail.get("loc") or [])
            lines.append(f"{loc}: {detail['msg']}" if loc else str(detail["msg"]))
        return lines
    return [json.dumps(details, ensure_ascii=False, default=str)]
