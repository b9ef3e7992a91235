"""Both directions of a relay (a client's WebSocket and a stream), run until one ends."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

__all__ = ["until_either"]


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
