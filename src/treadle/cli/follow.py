"""Following an execution to its end: the output WebSocket first, polling as the fallback."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from treadle.cli.output import ChunkWriter, write_output

if TYPE_CHECKING:
    from treadle.client import Client
    from treadle.client._api import JSONObject

__all__ = ["follow_to_end", "poll_to_end"]

_POLL_FIRST_S = 0.05
_POLL_MAX_S = 0.5
# A terminal execution whose output never becomes complete (its node died before sending
# every chunk) must not be polled forever: give the stragglers this many polls to arrive.
_INCOMPLETE_POLLS = 20


def follow_to_end(client: Client, execution_id: str, write: ChunkWriter) -> JSONObject:
    """Write the output as it arrives and return the finished execution."""
    from treadle.client import TreadleAPIError, TreadleConnectionError

    after_seq: int | None = None
    try:
        for message in client.follow(execution_id):
            if message["type"] == "end":
                return dict(message["execution"])
            write(str(message.get("stream")), str(message.get("data", "")))
            seq = message.get("seq")
            if isinstance(seq, int):
                after_seq = seq
    except (TreadleConnectionError, TreadleAPIError):
        # No WebSocket (a proxy that refuses upgrades, an older server) or it broke off:
        # carry on over plain HTTP from the last chunk seen. A real API error, such as a
        # bad key, is raised again by the first poll.
        pass
    return poll_to_end(client, execution_id, write, after_seq)


def poll_to_end(
    client: Client, execution_id: str, write: ChunkWriter, after_seq: int | None = None
) -> JSONObject:
    delay = _POLL_FIRST_S
    attempt: object = None
    terminal_polls = 0
    while True:
        output = client.output(execution_id, after_seq)
        if attempt is not None and output.get("attempt") != attempt:
            # A retry starts its own output with its own seq numbers: read it from the start.
            attempt, after_seq = output.get("attempt"), None
            continue
        attempt = output.get("attempt")
        write_output(output, write)
        # `next_seq` is the seq the next chunk will get, and `after_seq` is exclusive.
        next_seq = output.get("next_seq")
        last_seq = next_seq - 1 if isinstance(next_seq, int) and next_seq > 0 else None
        got_output = last_seq is not None and last_seq != after_seq
        if got_output:
            after_seq = last_seq
        if output.get("complete"):
            return client.get_execution(execution_id)
        execution = client.get_execution(execution_id)
        if execution.get("state") not in ("open", "running"):
            terminal_polls += 1
            if terminal_polls > _INCOMPLETE_POLLS:
                return execution
        delay = _POLL_FIRST_S if got_output else min(delay * 2, _POLL_MAX_S)
        time.sleep(delay)
