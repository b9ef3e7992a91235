"""Both directions of a relay (a client's WebSocket and a stream), run until one ends."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import WebSocket, WebSocketDisconnect

from treadle.domain.errors import TreadleError
from treadle.weaver.api.deps import get_weaver, principal_of
from treadle.weaver.api.errors import error_body

__all__ = ["follow_for_caller", "until_either", "until_gone"]

# Close codes past 4000 for errors that have an HTTP status of their own (else 4400).
_CLOSE_CODES = {"not_found": 404, "limit_exceeded": 429}


async def until_either(*directions: Coroutine[Any, Any, None]) -> list[asyncio.Task[None]]:
    """Run `directions` until one of them ends; the others are cancelled, and all are waited
    for before this returns (so nothing of theirs outlives the relay). Returns their tasks,
    in order, for a caller that wants to know how each ended."""
    tasks = [asyncio.create_task(direction) for direction in directions]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return tasks


async def until_gone(websocket: WebSocket, follow: Coroutine[Any, Any, None]) -> None:
    """Run `follow` until it ends or the client disconnects, whichever comes first.

    The follower only ever sends, and while an execution is silent it sends nothing, so it
    would not learn that its client left until the execution ended, perhaps days later,
    polling and holding its subscription all that time. Reading the socket is what reveals
    the disconnect."""
    # Both waited for, so the follower's subscription is closed before this returns.
    follower, listener = await until_either(follow, _disconnected(websocket))
    if not follower.cancelled():
        follower.result()  # its own end, or its error for the caller to report
    elif not listener.cancelled():
        listener.result()


async def _disconnected(websocket: WebSocket) -> None:
    # Clients have nothing to say on this socket; anything they send is ignored.
    while (await websocket.receive())["type"] != "websocket.disconnect":
        pass


async def follow_for_caller(
    websocket: WebSocket, follow: Callable[[str], Coroutine[Any, Any, None]]
) -> None:
    """A socket that only sends: authenticate, accept, and run `follow` (given the caller's
    tenant) until it ends or the client goes; a TreadleError it raises becomes an error body
    and a 4xxx close code (4404 for not found, 4429 past the tenant's follow sockets)."""
    try:
        principal = await principal_of(websocket)
    except TreadleError:
        await websocket.close(code=1008)
        return
    await websocket.accept()
    try:
        with get_weaver(websocket).followers.held(principal.tenant_id):
            await until_gone(websocket, follow(principal.tenant_id))
    except TreadleError as exc:
        await websocket.send_json(error_body(exc.code, exc.message, exc.details))
        await websocket.close(code=4000 + _CLOSE_CODES.get(exc.code, 400))
    except WebSocketDisconnect:
        pass
