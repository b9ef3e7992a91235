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
    # the replica that published it, when another one did; empty for this process's own
    origin: str = ""


class Subscription(Protocol):
    async def get(self, within: float | None = None) -> BusEvent | None:
        """The next event, or None when `within` seconds pass first."""

    def drain(self) -> int:
        """Discard the events already waiting; how many there were."""

    def close(self) -> None: ...


class EventBus(Protocol):
    async def publish(self, events: Sequence[BusEvent]) -> None: ...

    def subscribe(self, topics: Iterable[str], max_queued: int | None = None) -> Subscription:
        """`max_queued`: how many undelivered events to keep before dropping the oldest;
        None for the bus's default, 0 for no limit."""

    async def close(self) -> None: ...


# A subscriber that falls behind (a follower whose client reads slowly gets one event per
# output frame) must not grow its queue without bound. Subscribers read the current state
# after an event rather than rely on every event's contents, so losing the oldest is
# harmless; the newest, which carries the latest state, is always kept.
MAX_QUEUED = 256


class _QueueSubscription:
    def __init__(self, bus: InProcessBus, topics: frozenset[str], maxsize: int) -> None:
        self._bus = bus
        self.topics = topics
        self.queue: asyncio.Queue[BusEvent] = asyncio.Queue(maxsize)
        self.dropped = 0

    def put(self, event: BusEvent) -> None:
        if self.queue.maxsize and self.queue.full():
            self.queue.get_nowait()
            self.dropped += 1
        self.queue.put_nowait(event)

    async def get(self, within: float | None = None) -> BusEvent | None:
        # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that
        # arrives together with an event, leaving the follower running after its client left.
        try:
            async with asyncio.timeout(within):
                return await self.queue.get()
        except TimeoutError:
            return None

    def drain(self) -> int:
        count = 0
        while not self.queue.empty():
            self.queue.get_nowait()
            count += 1
        return count

    def close(self) -> None:
        self._bus._remove(self)

    def __enter__(self) -> _QueueSubscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class InProcessBus:
    """Delivers to subscribers of the same process; the default for a single Weaver."""

    def __init__(self, max_queued: int = MAX_QUEUED) -> None:
        self._by_topic: dict[str, set[_QueueSubscription]] = {}
        self._max_queued = max_queued

    async def publish(self, events: Sequence[BusEvent]) -> None:
        for event in events:
            for sub in self._by_topic.get(event.topic, ()):
                sub.put(event)

    def subscribe(self, topics: Iterable[str], max_queued: int | None = None) -> _QueueSubscription:
        limit = self._max_queued if max_queued is None else max_queued
        sub = _QueueSubscription(self, frozenset(topics), limit)
        for topic in sub.topics:
            self._by_topic.setdefault(topic, set()).add(sub)
        return sub

    def subscriber_count(self, topic: str) -> int:
        """Open subscriptions to `topic`; lets tests see that a subscriber has let go."""
        return len(self._by_topic.get(topic, ()))

    def _remove(self, sub: _QueueSubscription) -> None:
        for topic in sub.topics:
            subs = self._by_topic.get(topic)
            if subs is not None:
                subs.discard(sub)
                if not subs:
                    del self._by_topic[topic]

    async def close(self) -> None:
        self._by_topic.clear()
