"""The event bus across Weaver replicas, over a NATS JetStream stream.

Every replica publishes its events to one stream and reads all of it back through an ordered
consumer that starts at new messages. Subscribers in the publishing process are served at
once, as by `InProcessBus`; the copy that comes back from the stream is skipped there.

Publishing never holds up the caller (the writer, right after a commit): events wait in a
bounded queue for a sender task, which publishes them and waits for the stream to store
them, and tries again while NATS is unreachable. The stream deduplicates by event id
(`Nats-Msg-Id`), so a publish retried after a lost acknowledgement is stored once.
Subscribers treat events as "look again" (they read the store afterwards), so an event
that never crosses costs a remote waiter at most its polling interval, not correctness.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterable, Sequence
from typing import Any

import nats
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy, StorageType, StreamConfig
from nats.js.errors import BadRequestError, NotFoundError

from treadle.weaver.background import cancel_and_wait
from treadle.weaver.events.bus import MAX_QUEUED, BusEvent, InProcessBus, Subscription
from treadle.weaver.ids import new_id

__all__ = ["NatsBus"]

log = logging.getLogger(__name__)

_ORIGIN = "Treadle-Origin"
# What waits to be published while NATS is away; past it the oldest are dropped (see above).
_MAX_UNSENT = 100_000
# Events are for replicas that are up now, not a history: keep them briefly.
_KEEP_S = 600.0
_DEDUP_WINDOW_S = 120.0


class NatsBus:
    def __init__(
        self,
        url: str,
        stream: str = "TREADLE",
        prefix: str = "treadle",
        max_queued: int = MAX_QUEUED,
    ) -> None:
        self.url = url
        self.stream = stream
        self.prefix = prefix
        self.origin = new_id("wv")
        self._local = InProcessBus(max_queued)
        # None asks the sender to stop (see close)
        self._unsent: asyncio.Queue[BusEvent | None] = asyncio.Queue()
        self._nc: NatsClient | None = None
        self._js: JetStreamContext | None = None
        self._sender: asyncio.Task[None] | None = None
        self.dropped = 0

    async def connect(self) -> NatsBus:
        self._nc = await nats.connect(
            self.url,
            name=f"treadle-weaver-{self.origin}",
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.5,
            connect_timeout=5,
        )
        self._js = self._nc.jetstream()
        try:
            await self._ensure_stream(self._js)
            await self._js.subscribe(
                f"{self.prefix}.>",
                stream=self.stream,
                ordered_consumer=True,
                deliver_policy=DeliverPolicy.NEW,
                cb=self._received,
            )
        except BaseException:
            # A bus that could not join the stream holds no connection.
            await self._nc.close()
            raise
        self._sender = asyncio.create_task(self._send_loop(), name="treadle-nats-sender")
        return self

    async def _ensure_stream(self, js: JetStreamContext) -> None:
        try:
            await js.stream_info(self.stream)
            return
        except NotFoundError:
            pass
        config = StreamConfig(
            name=self.stream,
            subjects=[f"{self.prefix}.>"],
            storage=StorageType.FILE,
            max_age=_KEEP_S,
            duplicate_window=_DEDUP_WINDOW_S,
        )
        try:
            await js.add_stream(config)
        except BadRequestError:
            # Replicas racing here send the same configuration. NATS usually accepts it twice,
            # but while another replica's creation is still in flight it may refuse it
            # ("subjects overlap"): the stream is there then, made by that replica.
            await js.stream_info(self.stream)

    async def publish(self, events: Sequence[BusEvent]) -> None:
        await self._local.publish(events)
        for event in events:
            if self._unsent.qsize() >= _MAX_UNSENT:
                self._unsent.get_nowait()
                self._unsent.task_done()
                self.dropped += 1
            self._unsent.put_nowait(event)

    def subscribe(self, topics: Iterable[str], max_queued: int | None = None) -> Subscription:
        return self._local.subscribe(topics, max_queued)

    def subscriber_count(self, topic: str) -> int:
        return self._local.subscriber_count(topic)

    async def flush(self) -> None:
        """Wait until everything published so far is stored in the stream."""
        await self._unsent.join()

    async def close(self) -> None:
        # A sentinel rather than Task.cancel: a cancel of the sender, waiting on its queue
        # after the NATS client delivered to this process, was seen not to take effect.
        if self._sender is not None:
            self._unsent.put_nowait(None)
            try:
                await asyncio.wait_for(asyncio.shield(self._sender), timeout=5)
            except TimeoutError:
                await cancel_and_wait(self._sender)
            self._sender = None
        if self._nc is not None:
            await self._nc.close()
            self._nc = None
        await self._local.close()

    async def _send_loop(self) -> None:
        while True:
            first = await self._unsent.get()
            if first is None:
                return
            batch = [first]
            stop = False
            while not self._unsent.empty() and len(batch) < 1024:
                item = self._unsent.get_nowait()
                if item is None:
                    stop = True
                    break
                batch.append(item)
            await self._send(batch)
            for _ in batch:
                self._unsent.task_done()
            if stop:
                return

    async def _send(self, batch: list[BusEvent]) -> None:
        assert self._js is not None
        delay = 0.05
        while True:
            try:
                acks = [
                    await self._js.publish_async(
                        f"{self.prefix}.{event.topic}",
                        _encode(event),
                        headers={"Nats-Msg-Id": event.id, _ORIGIN: self.origin},
                    )
                    for event in batch
                ]
                await asyncio.wait_for(asyncio.gather(*acks), timeout=5)
                return
            except Exception as exc:
                log.warning("publishing %d events to NATS failed (%s); retrying", len(batch), exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def _received(self, msg: Msg) -> None:
        if (msg.headers or {}).get(_ORIGIN) == self.origin:
            return
        try:
            event = _decode(msg.data, origin=(msg.headers or {}).get(_ORIGIN) or "unknown")
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring a malformed event on %s", msg.subject)
            return
        await self._local.publish([event])


def _encode(event: BusEvent) -> bytes:
    return json.dumps(
        {
            "id": event.id,
            "type": event.type,
            "topic": event.topic,
            "subject_id": event.subject_id,
            "tenant_id": event.tenant_id,
            "data": event.data,
            "created_at": event.created_at,
        },
        separators=(",", ":"),
    ).encode()


def _decode(raw: bytes, origin: str) -> BusEvent:
    body: dict[str, Any] = json.loads(raw)
    return BusEvent(
        id=body["id"],
        type=body["type"],
        topic=body["topic"],
        subject_id=body["subject_id"],
        tenant_id=body.get("tenant_id"),
        data=body.get("data") or {},
        created_at=float(body.get("created_at") or 0.0),
        origin=origin,
    )
