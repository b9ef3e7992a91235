"""The event bus contract, run against every implementation: in-process, and NATS JetStream
across two Weaver replicas. `peers` are two buses that serve the same fleet: for the
in-process bus that is one bus; for NATS, two connections to one stream, as two replicas."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from support.nats import NatsServer
from treadle.weaver.events.bus import BusEvent, EventBus, InProcessBus
from treadle.weaver.events.nats import NatsBus

Peers = tuple[EventBus, EventBus]


def event(n: int, topic: str = "execution.ex_1", **data: Any) -> BusEvent:
    return BusEvent(
        id=f"ev_{n}",
        type="execution.running",
        topic=topic,
        subject_id="ex_1",
        data={"n": n, **data},
    )


@pytest.fixture(params=["in-process", "nats"])
async def peers(request: pytest.FixtureRequest) -> AsyncIterator[Peers]:
    if request.param == "in-process":
        bus = InProcessBus()
        yield bus, bus
        await bus.close()
        return
    server: NatsServer = request.getfixturevalue("nats_server")
    stream = server.new_stream()
    a = await NatsBus(server.url, stream=stream, prefix=stream.lower()).connect()
    b = await NatsBus(server.url, stream=stream, prefix=stream.lower()).connect()
    yield a, b
    await a.close()
    await b.close()


async def received(sub: Any, count: int, within: float = 10.0) -> list[BusEvent]:
    got = []
    for _ in range(count):
        item = await sub.get(within=within)
        assert item is not None, f"only {len(got)} of {count} events arrived"
        got.append(item)
    return got


async def test_a_peer_receives_its_topics_in_order_and_nothing_else(peers: Peers) -> None:
    publisher, subscriber = peers
    sub = subscriber.subscribe(["execution.ex_1", "fleet"])
    try:
        await publisher.publish(
            [event(1), event(2, topic="execution.ex_2"), event(3, topic="fleet"), event(4)]
        )
        got = await received(sub, 3)
        assert [e.id for e in got] == ["ev_1", "ev_3", "ev_4"]
        assert [e.data["n"] for e in got] == [1, 3, 4]
        assert got[1].topic == "fleet"
        assert await sub.get(within=0.2) is None
    finally:
        sub.close()


async def test_events_keep_their_fields_across_the_bus(peers: Peers) -> None:
    publisher, subscriber = peers
    sub = subscriber.subscribe(["node.nd_9"])
    try:
        sent = BusEvent(
            id="ev_x",
            type="node.down",
            topic="node.nd_9",
            subject_id="nd_9",
            tenant_id="tn_1",
            data={"nested": {"list": [1, "two", None]}, "text": "héllo"},
            created_at=1234.5,
        )
        await publisher.publish([sent])
        (got,) = await received(sub, 1)
        assert (got.id, got.type, got.topic, got.subject_id, got.tenant_id) == (
            "ev_x",
            "node.down",
            "node.nd_9",
            "nd_9",
            "tn_1",
        )
        assert got.data == sent.data
        assert got.created_at == 1234.5
    finally:
        sub.close()


async def test_the_publishing_replica_gets_each_event_once(peers: Peers) -> None:
    publisher, other = peers
    local = publisher.subscribe(["execution.ex_1"])
    remote = other.subscribe(["execution.ex_1"])
    try:
        await publisher.publish([event(1), event(2)])
        assert [e.id for e in await received(local, 2)] == ["ev_1", "ev_2"]
        assert all(e.origin == "" for e in await received(remote, 2) if other is publisher)
        # By now the stream has carried the events back to every replica, the publisher too.
        assert await local.get(within=0.3) is None
    finally:
        local.close()
        remote.close()


async def test_only_events_from_another_replica_name_an_origin(peers: Peers) -> None:
    publisher, other = peers
    sub = other.subscribe(["fleet"])
    try:
        await publisher.publish([event(1, topic="fleet")])
        (got,) = await received(sub, 1)
        assert (got.origin != "") == (publisher is not other)
    finally:
        sub.close()


async def test_a_closed_subscription_receives_nothing_and_is_released(peers: Peers) -> None:
    publisher, subscriber = peers
    kept = subscriber.subscribe(["execution.ex_1"])
    gone = subscriber.subscribe(["execution.ex_1"])
    gone.close()
    try:
        await publisher.publish([event(1)])
        await received(kept, 1)
        assert await gone.get(within=0.2) is None
        count: Callable[[str], int] = subscriber.subscriber_count  # type: ignore[attr-defined]
        assert count("execution.ex_1") == 1
    finally:
        kept.close()
    assert subscriber.subscriber_count("execution.ex_1") == 0  # type: ignore[attr-defined]


async def test_a_burst_arrives_complete_and_in_order(peers: Peers) -> None:
    publisher, subscriber = peers
    sub = subscriber.subscribe(["output.ex_1"])
    try:
        for start in range(0, 200, 20):
            await publisher.publish(
                [event(n, topic="output.ex_1") for n in range(start, start + 20)]
            )
        got = await received(sub, 200)
        assert [e.data["n"] for e in got] == list(range(200))
    finally:
        sub.close()


async def test_nats_stores_a_republished_event_once(nats_server: NatsServer) -> None:
    """A publish retried after a lost acknowledgement must not deliver the event twice."""
    stream = nats_server.new_stream()
    a = await NatsBus(nats_server.url, stream=stream, prefix=stream.lower()).connect()
    b = await NatsBus(nats_server.url, stream=stream, prefix=stream.lower()).connect()
    sub = b.subscribe(["fleet"])
    try:
        await a.publish([event(1, topic="fleet")])
        await a.publish([event(1, topic="fleet"), event(2, topic="fleet")])
        got = await received(sub, 2)
        assert [e.id for e in got] == ["ev_1", "ev_2"]
        await a.flush()
        assert await sub.get(within=0.3) is None
    finally:
        sub.close()
        await a.close()
        await b.close()


async def test_nats_replicas_share_one_stream_whoever_created_it(nats_server: NatsServer) -> None:
    stream = nats_server.new_stream()
    buses = await asyncio.gather(
        *(
            NatsBus(nats_server.url, stream=stream, prefix=stream.lower()).connect()
            for _ in range(3)
        )
    )
    subs = [bus.subscribe(["fleet"]) for bus in buses]
    try:
        await buses[0].publish([event(7, topic="fleet")])
        for sub in subs:
            (got,) = await received(sub, 1)
            assert got.id == "ev_7"
    finally:
        for sub in subs:
            sub.close()
        for bus in buses:
            await bus.close()
