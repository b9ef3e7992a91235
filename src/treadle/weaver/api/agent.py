"""/v1/agent: the socket every Shuttle dials out to (DESIGN §3).

The handshake is refused (HTTP 403) unless it carries a valid join token or node credential.
Reports are handed to the writer without waiting for their commit, so one node's frames are
applied in order and pipelined; replies (acks, fencing cancels) go out once committed.

What each frame after the hello does is `treadle.weaver.services.frames`'s dispatch table.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from fastapi import APIRouter, WebSocket, WebSocketDisconnect

from treadle.domain.errors import ProtocolError
from treadle.domain.node import NodeState
from treadle.protocol import (
    PROTOCOL_VERSION,
    Assign,
    Hello,
    WeaverMessage,
    Welcome,
    decode_from_shuttle,
    encode,
)
from treadle.weaver.api.deps import bearer, get_weaver
from treadle.weaver.background import cancel_and_wait
from treadle.weaver.core import Weaver
from treadle.weaver.services.frames import FrameHandler
from treadle.weaver.services.nodes import NodeSession
from treadle.weaver.store.writer import Tx

__all__ = ["router"]

log = logging.getLogger(__name__)
router = APIRouter()
_HELLO_TIMEOUT_S = 10.0
# Reports handed to the writer but not yet committed, per node: past this the socket stops
# reading, so a node that outruns the database is slowed down instead of buffered forever.
_MAX_IN_FLIGHT = 2048


async def _credential(weaver: Weaver, websocket: WebSocket) -> tuple[bool, str | None]:
    """(accepted, node_id): a node credential `node_id:secret` or a join token."""
    token = bearer(websocket.headers)
    if token is None:
        return False, None
    if ":" in token:
        node_id, _, secret = token.partition(":")
        return await weaver.auth.node_credential_valid(node_id, secret), node_id
    return await weaver.auth.join_token_valid(token), None


@router.websocket("/v1/agent")
async def agent(websocket: WebSocket) -> None:
    weaver = get_weaver(websocket)
    accepted, node_id = await _credential(weaver, websocket)
    if not accepted:
        await websocket.close(code=1008)
        return
    await websocket.accept()
    try:
        async with asyncio.timeout(_HELLO_TIMEOUT_S):
            raw = await websocket.receive_text()
        hello = decode_from_shuttle(raw)
    except (TimeoutError, ProtocolError, WebSocketDisconnect, KeyError):
        with contextlib.suppress(Exception):
            await websocket.close(code=1002, reason="expected hello")
        return
    if not isinstance(hello, Hello) or hello.protocol != PROTOCOL_VERSION:
        await websocket.close(code=1002, reason=f"expected hello with protocol {PROTOCOL_VERSION}")
        return
    # Until its session is registered the node counts as present, so the reconciler cannot
    # declare it down while its hello is being reconciled.
    connecting = weaver.registry.connecting
    if node_id is not None:
        connecting.add(node_id)
    try:
        # A node new to Weaver holds no work yet, so only a known one needs to count as
        # present from the start.
        node_id, secret = await weaver.nodes.register(hello, node_id)
        session = await _join(websocket, weaver, hello, node_id, secret)
    finally:
        if node_id is not None:
            connecting.discard(node_id)
    sender = asyncio.create_task(_send_loop(websocket, session, weaver.settings.max_output_bytes))
    try:
        await _receive_loop(websocket, weaver, session)
    except WebSocketDisconnect:
        pass
    finally:
        # The sender may have ended first, with the disconnect as its error: that must not
        # skip letting go of the session.
        with contextlib.suppress(Exception):
            await cancel_and_wait(sender)
        weaver.streams.link_lost(session)
        if weaver.registry.remove(session):
            with contextlib.suppress(Exception):
                await weaver.nodes.set_state(node_id, NodeState.DISCONNECTED)


async def _join(
    websocket: WebSocket, weaver: Weaver, hello: Hello, node_id: str, secret: str | None
) -> NodeSession:
    """Welcome the node, reconcile what it runs, and make its session the live one."""
    session = NodeSession(node_id=node_id, hello=hello)
    session.draining, session.reliability = await weaver.nodes.standing(node_id)
    await websocket.send_text(
        encode(
            Welcome(
                protocol=PROTOCOL_VERSION,
                node_id=node_id,
                node_secret=secret,
                heartbeat_s=weaver.settings.heartbeat_s,
            )
        )
    )

    async def reconcile(tx: Tx) -> list[WeaverMessage]:
        executions = [ref for ref in hello.workloads if ref.kind == "execution"]
        sandboxes = [ref for ref in hello.workloads if ref.kind == "sandbox"]
        replies = await weaver.reports.hello(tx, session, executions)
        return replies + await weaver.sandboxes.hello(tx, session, sandboxes)

    for reply in await weaver.writer.run(reconcile):
        session.send(reply)
    weaver.registry.add(session)
    return session


async def _send_loop(websocket: WebSocket, session: NodeSession, max_output_bytes: int) -> None:
    while True:
        message = await session.outbox.get()
        if message is None:  # replaced by a newer connection of the same node
            await websocket.close(code=1000, reason="superseded")
            return
        if isinstance(message, Assign) and message.spec.max_output_bytes is None:
            # Every assignment leaves with this Weaver's output cap, so the node stops
            # sending what would be dropped here anyway.
            spec = message.spec.model_copy(update={"max_output_bytes": max_output_bytes})
            message = message.model_copy(update={"spec": spec})
        try:
            frame = encode(message)
        except ValueError:
            # Input is validated so this cannot happen; if it does, losing one frame is
            # better than losing the node's only sender.
            log.exception("cannot encode a %s frame for node %s", message.type, session.node_id)
            continue
        await websocket.send_text(frame)


async def _next_frame(websocket: WebSocket) -> str | bytes:
    message = await websocket.receive()
    if message["type"] == "websocket.disconnect":
        raise WebSocketDisconnect(message.get("code", 1000), message.get("reason"))
    raw: str | bytes | None = message.get("text")
    if raw is None:
        raw = message.get("bytes") or b""
    return raw


async def _receive_loop(websocket: WebSocket, weaver: Weaver, session: NodeSession) -> None:
    # A count and an event, not an asyncio.Semaphore: its acquire was ~5 % of Weaver's
    # time per frame under load.
    in_flight = 0
    room = asyncio.Event()

    def replied(future: asyncio.Future[Any]) -> None:
        nonlocal in_flight
        in_flight -= 1
        room.set()
        if future.cancelled():
            return
        if future.exception() is not None:
            log.error("report from node %s failed", session.node_id, exc_info=future.exception())
            return
        for reply in future.result():
            session.send(reply)

    frames = FrameHandler(weaver, session)
    while True:
        raw = await _next_frame(websocket)
        session.last_seen = time.monotonic()
        handler = frames.handle(raw)
        if handler is None:
            continue
        while in_flight >= _MAX_IN_FLIGHT:
            room.clear()
            await room.wait()
        in_flight += 1
        weaver.writer.submit(handler).add_done_callback(replied)
