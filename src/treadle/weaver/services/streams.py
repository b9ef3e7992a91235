"""Exec streams between clients and sandboxes, on the links of this replica's nodes.

A stream is numbered here, opened with `ExecStart` on the sandbox's node link, and fed by
that node's `StreamData`/`StreamEnd` frames. Flow control is by window: the node sends at
most what was granted, and more is granted as the client takes what came, so a client that
stops reading holds back its own process and nothing else on the link. What a node sends is
checked like any frame from a node: a stream it does not own, bytes that are not base64, or
more than the window are refused, and the stream ends with an error.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import itertools
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from treadle.domain.errors import InvalidRequest, LimitExceeded
from treadle.protocol import (
    ExecStart,
    FileStart,
    PortStart,
    ProcessCall,
    Pty,
    StreamAck,
    StreamData,
    StreamDetach,
    StreamEnd,
    StreamInput,
    StreamResize,
    StreamSignal,
    StreamStarted,
    StreamWindow,
)
from treadle.protocol.limits import MAX_FRAME_BYTES
from treadle.protocol.messages import STREAM_CHUNK_BYTES, encode
from treadle.weaver.services.nodes import NodeSession

__all__ = ["Ended", "ExecStream", "Started", "StreamHub"]

log = logging.getLogger(__name__)
WINDOW = 1024 * 1024
# Input (stdin, an upload, a request's body) sent to a node and not yet passed on by it, per
# stream, past which a writer that drains waits: well under what a node holds (16 MiB).
INPUT_WINDOW = 4 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Ended:
    exit_code: int | None
    signal: int | None
    error: str | None
    # a file operation's: the errno name of its failure, or its result
    error_code: str | None = None
    result: Any = None
    timed_out: bool = False


@dataclass(frozen=True, slots=True)
class Started:
    pid: int | None
    tag: str | None


class ExecStream:
    """One process's streams as a client sees them: (channel, bytes) until `ended`."""

    def __init__(self, hub: StreamHub, session: NodeSession, number: int, tenant_id: str) -> None:
        self._hub = hub
        self.tenant_id = tenant_id
        self.session = session
        self.number = number
        self._items: asyncio.Queue[tuple[str, bytes] | Ended] = asyncio.Queue()
        self._held = 0
        self.ended: Ended | None = None
        self._started: asyncio.Future[Started | None] = asyncio.get_running_loop().create_future()
        self._unacked = 0  # input sent and not yet passed on by the node
        self._over = False  # its end has come from the node (`ended` once it is read)
        self._acked = asyncio.Event()

    async def started(self) -> Started | None:
        """The process the stream follows (pid, tag); None when it ended without one."""
        return await asyncio.shield(self._started)

    async def output(self) -> AsyncIterator[tuple[str, bytes]]:
        while True:
            item = await self._items.get()
            if isinstance(item, Ended):
                self.ended = item
                self._items.put_nowait(item)
                return
            self._held -= len(item[1])
            self.session.send(StreamWindow(stream=self.number, bytes=len(item[1])))
            yield item

    async def wait(self) -> Ended:
        async for _ in self.output():
            pass
        assert self.ended is not None
        return self.ended

    def write(self, data: bytes, *, eof: bool = False) -> None:
        """Send input now; `drain` paces a writer that sends much of it."""
        self._unacked += len(data)
        for start in range(0, max(len(data), 1), STREAM_CHUNK_BYTES):
            piece = data[start : start + STREAM_CHUNK_BYTES]
            last = start + STREAM_CHUNK_BYTES >= len(data)
            self.session.send(
                StreamInput(
                    stream=self.number, data=base64.b64encode(piece).decode(), eof=eof and last
                )
            )

    @property
    def over(self) -> bool:
        """Whether its end has come from the node (read or not)."""
        return self._over

    async def drain(self) -> None:
        """Wait until the node has passed on enough of the input sent (or the stream ended)."""
        while self._unacked > INPUT_WINDOW and not self._over:
            self._acked.clear()
            await self._acked.wait()

    def _ack(self, size: int) -> None:
        self._unacked = max(0, self._unacked - size)
        self._acked.set()

    def signal(self, number: int) -> None:
        self.session.send(StreamSignal(stream=self.number, signal=number))

    def resize(self, rows: int, cols: int) -> None:
        self.session.send(StreamResize(stream=self.number, rows=rows, cols=cols))

    def detach(self) -> None:
        """The client went away: the node stops relaying (the process runs on)."""
        if self._hub.forget(self):
            self.session.send(StreamDetach(stream=self.number))

    def _data(self, channel: str, data: bytes) -> bool:
        self._held += len(data)
        if self._held > WINDOW:
            return False
        self._items.put_nowait((channel, data))
        return True

    def _end(self, ended: Ended) -> None:
        if not self._started.done():
            self._started.set_result(None)
        self._items.put_nowait(ended)
        self._over = True
        self._acked.set()


class StreamHub:
    def __init__(self, max_per_tenant: int = 64) -> None:
        self._numbers = itertools.count(1)
        self._streams: dict[int, ExecStream] = {}
        self._max_per_tenant = max_per_tenant

    def open(
        self,
        session: NodeSession,
        tenant_id: str,
        sandbox_id: str,
        incarnation: int,
        argv: list[str],
        *,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        tag: str | None = None,
        stdin: bool = False,
        pty: tuple[int, int] | None = None,
        timeout_s: float | None = None,
        user: str | None = None,
    ) -> ExecStream:
        return self.start(
            session,
            tenant_id,
            ExecStart,
            sandbox_id,
            incarnation,
            argv=argv,
            env=env or {},
            cwd=cwd,
            tag=tag,
            stdin=stdin,
            pty=None if pty is None else Pty(rows=pty[0], cols=pty[1]),
            timeout_s=timeout_s,
            user=user,
        )

    def start(
        self,
        session: NodeSession,
        tenant_id: str,
        frame: type[ExecStart | FileStart | ProcessCall | PortStart],
        sandbox_id: str,
        incarnation: int,
        **fields: Any,
    ) -> ExecStream:
        """A stream on a sandbox: a process (`ExecStart`, as `open` makes it), a file
        operation (`FileStart`), a call about its processes (`ProcessCall`), a connection to
        one of its ports (`PortStart`)."""
        self._admit(tenant_id)
        number = next(self._numbers)
        # Made (and so checked) before the stream counts: a request the frame refuses leaves
        # nothing open behind it.
        try:
            message = frame(
                stream=number, id=sandbox_id, incarnation=incarnation, window=WINDOW, **fields
            )
        except ValidationError as exc:
            raise InvalidRequest(f"not a request a node takes: {exc}") from None
        size = len(encode(message).encode())
        if size > MAX_FRAME_BYTES:
            raise InvalidRequest(
                f"the request is {size} bytes as a frame to its node; at most {MAX_FRAME_BYTES}",
                details={"limit": "frame_bytes", "value": MAX_FRAME_BYTES},
            )
        stream = ExecStream(self, session, number, tenant_id)
        self._streams[number] = stream
        session.send(message)
        return stream

    def _admit(self, tenant_id: str) -> None:
        open_now = sum(1 for s in self._streams.values() if s.tenant_id == tenant_id)
        if open_now >= self._max_per_tenant:
            raise LimitExceeded(
                f"this tenant has {open_now} exec streams open; the limit is "
                f"{self._max_per_tenant} (TREADLE_MAX_EXEC_STREAMS_PER_TENANT)",
                details={"limit": "max_exec_streams_per_tenant", "value": self._max_per_tenant},
            )

    def forget(self, stream: ExecStream) -> bool:
        return self._streams.pop(stream.number, None) is not None

    def data(self, session: NodeSession, message: StreamData) -> None:
        stream = self._owned(session, message.stream)
        if stream is None:
            return
        try:
            data = base64.b64decode(message.data, validate=True)
        except (binascii.Error, ValueError):
            self._fail(stream, "the node sent output that is not base64")
            return
        if not stream._data(message.channel, data):
            self._fail(stream, "the node sent past the stream's window")

    def started(self, session: NodeSession, message: StreamStarted) -> None:
        stream = self._owned(session, message.stream)
        if stream is not None and not stream._started.done():
            stream._started.set_result(Started(message.pid, message.tag))

    def ack(self, session: NodeSession, message: StreamAck) -> None:
        stream = self._owned(session, message.stream)
        if stream is not None:
            stream._ack(message.bytes)

    def end(self, session: NodeSession, message: StreamEnd) -> None:
        stream = self._owned(session, message.stream)
        if stream is not None:
            self._streams.pop(stream.number, None)
            stream._end(
                Ended(
                    message.exit_code,
                    message.signal,
                    message.error,
                    message.error_code,
                    message.result,
                    message.timed_out,
                )
            )

    def link_lost(self, session: NodeSession) -> None:
        """The node's link went: its streams end (their processes may run on)."""
        for stream in [s for s in self._streams.values() if s.session is session]:
            self._streams.pop(stream.number, None)
            stream._end(Ended(None, None, "the link to the sandbox's node was lost"))

    def _owned(self, session: NodeSession, number: int) -> ExecStream | None:
        stream = self._streams.get(number)
        if stream is None or stream.session is not session:
            return None  # ended here already, or another node's: ignored
        return stream

    def _fail(self, stream: ExecStream, why: str) -> None:
        log.warning("node %s, stream %d: %s", stream.session.node_id, stream.number, why)
        self._streams.pop(stream.number, None)
        stream.session.send(StreamDetach(stream=stream.number))
        stream._end(Ended(None, None, why))
