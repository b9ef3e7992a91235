"""Publish/subscribe by exact topic. Events are published after the transaction that
recorded them commits, so a subscriber never sees a change that could still roll back."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = ["BusEvent", "EventBus", "InProcessBus", "Subscription"]


@dataclass(frozen=True, slots=True)
class BusEvent:
    id: str
    type: str
    topic: str
    subject_id: str
    tenant_id: str | None = None
    data: dict[str, Any] = field(default_factory=dict)
    created_at: float = 0.0


class Subscription(Protocol):
    async def get(self, within: float | None = None) -> BusEvent | None:
        """The next event, or None when `within` seconds pass first."""

    def close(self) -> None: ...


class EventBus(Protocol):
    async def publish(self, events: Sequence[BusEvent]) -> None: ...

    def subscribe(self, topics: Iterable[str]) -> Subscription: ...

    async def close(self) -> None: ...


class _QueueSubscription:
    def __init__(self, bus: InProcessBus, topics: frozenset[str]) -> None:
        self._bus = bus
        self.topics = topics
        self.queue: asyncio.Queue[BusEvent] = asyncio.Queue()

    async def get(self, within: float | None = None) -> BusEvent | None:
        # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that
        # arrives together with an event, leaving the follower running after its client left.
        try:
            async with asyncio.timeout(within):
                return await self.queue.get()
        except TimeoutError:
            return None

    def close(self) -> None:
        self._bus._remove(self)

    def __enter__(self) -> _QueueSubscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class InProcessBus:
    """Delivers to subscribers of the same process; the default for a single Weaver."""

    def __init__(self) -> None:
        self._by_topic: dict[str, set[_QueueSubscription]] = {}

    async def publish(self, events: Sequence[BusEvent]) -> None:
        for event in events:
            for sub in self._by_topic.get(event.topic, ()):
                sub.queue.put_nowait(event)

    def subscribe(self, topics: Iterable[str]) -> _QueueSubscription:
        sub = _QueueSubscription(self, frozenset(topics))
        for topic in sub.topics:
            self._by_topic.setdefault(topic, set()).add(sub)
        return sub

    def _remove(self, sub: _QueueSubscription) -> None:
        for topic in sub.topics:
            subs = self._by_topic.get(topic)
            if subs is not None:
                subs.discard(sub)
                if not subs:
                    del self._by_topic[topic]

    async def close(self) -> None:
        self._by_topic.clear()
