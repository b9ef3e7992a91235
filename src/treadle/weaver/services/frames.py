"""What Weaver does with each frame a node sends on its agent link, by type.

Reports that change what is stored (an execution started, output, an exit, a sandbox's state
or activity) become a `Handler`: a write run by the writer, in the node's order, whose
replies (acks, fencing) go back once committed. Stream frames go straight to their clients
(nothing of them is stored) and heartbeats only mark the node alive.

After the hello, a frame outside the protocol is refused alone: it is logged and dropped, and
the execution it names, if any, fails (`ReportService.refused`); the link and the node's other
frames carry on. Closing the link instead would let one program that makes its node send such
a frame (which the node would replay after every reconnect) keep the node offline.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from treadle.domain.errors import ProtocolError
from treadle.protocol import (
    Exited,
    Heartbeat,
    Output,
    SandboxActivity,
    SandboxState,
    Started,
    StreamAck,
    StreamData,
    StreamEnd,
    StreamStarted,
    UsageReport,
    WeaverMessage,
    decode_from_shuttle,
    examine_refused,
)
from treadle.weaver.core import Weaver
from treadle.weaver.services.nodes import NodeSession
from treadle.weaver.store.writer import Tx

__all__ = ["FrameHandler", "Handler"]

log = logging.getLogger(__name__)

Handler = Callable[[Tx], Awaitable[list[WeaverMessage]]]


class FrameHandler:
    """The dispatch table for one node's link."""

    def __init__(self, weaver: Weaver, session: NodeSession) -> None:
        self._weaver = weaver
        self._session = session
        reports, sandboxes, streams = weaver.reports, weaver.sandboxes, weaver.streams
        cap = weaver.settings.max_output_bytes
        # frames applied by the writer
        self._stored: dict[type, Callable[[Any], Handler]] = {
            Started: lambda m: lambda tx: reports.started(tx, session, m),
            Output: lambda m: lambda tx: reports.output(tx, session, m, cap),
            Exited: lambda m: lambda tx: reports.exited(tx, session, m),
            SandboxState: lambda m: lambda tx: sandboxes.reported(tx, session, m),
            SandboxActivity: lambda m: lambda tx: sandboxes.activity(tx, session, m),
            UsageReport: lambda m: lambda tx: weaver.usage.report(tx, session, m),
        }
        # frames handled at once
        self._direct: dict[type, Callable[[Any], None]] = {
            Heartbeat: self._heartbeat,
            StreamStarted: lambda m: streams.started(session, m),
            StreamData: lambda m: streams.data(session, m),
            StreamAck: lambda m: streams.ack(session, m),
            StreamEnd: lambda m: streams.end(session, m),
        }

    def handle(self, raw: str | bytes) -> Handler | None:
        """Deal with one frame; a write to hand to the writer, if it needs one."""
        try:
            message = decode_from_shuttle(raw)
        except ProtocolError as exc:
            return self._refused(raw, exc)
        direct = self._direct.get(type(message))
        if direct is not None:
            direct(message)
            return None
        stored = self._stored.get(type(message))
        if stored is None:
            log.warning("node %s sent an unexpected %s frame", self._session.node_id, message.type)
            return None
        return stored(message)

    def _heartbeat(self, _message: Heartbeat) -> None:
        self._session.last_heartbeat = time.time()

    def _refused(self, raw: str | bytes, exc: ProtocolError) -> Handler | None:
        """What to do about a frame outside the protocol: apply the exit report it still
        holds (one whose only fault is its result), or fail the execution it names."""
        session = self._session
        seen = examine_refused(raw)
        log.warning(
            "node %s sent a %s frame outside the protocol (refused): %s %s",
            session.node_id,
            seen.type or "unreadable",
            exc.message,
            exc.details[:3] if isinstance(exc.details, list) else exc.details,
        )
        reports = self._weaver.reports
        if seen.exited is not None:
            exited = seen.exited
            return lambda tx: reports.exited(tx, session, exited)
        if seen.id is not None and seen.attempt is not None:
            kind, execution_id, attempt = seen.type, seen.id, seen.attempt
            return lambda tx: reports.refused(tx, session, kind, execution_id, attempt)
        return None
