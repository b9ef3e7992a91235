"""The in-process event bus: delivery by topic, coalescing, a bounded queue, release."""

from __future__ import annotations

from treadle.weaver.events.bus import BusEvent, InProcessBus


def event(n: int, topic: str = "output.ex_1") -> BusEvent:
    return BusEvent(id=f"ev_{n}", type="output", topic=topic, subject_id="ex_1", data={"n": n})


async def test_delivers_only_subscribed_topics_in_order() -> None:
    bus = InProcessBus()
    sub = bus.subscribe(["output.ex_1"])
    await bus.publish([event(1), event(2, topic="output.ex_2"), event(3)])
    first, second = await sub.get(within=1), await sub.get(within=1)
    assert first is not None and second is not None
    assert (first.id, second.id) == ("ev_1", "ev_3")
    assert await sub.get(within=0.01) is None
    sub.close()


async def test_drain_discards_what_is_queued_and_says_how_much() -> None:
    bus = InProcessBus()
    sub = bus.subscribe(["output.ex_1"])
    await bus.publish([event(n) for n in range(5)])
    woke = await sub.get(within=1)
    assert woke is not None and woke.id == "ev_0"
    assert sub.drain() == 4
    assert sub.drain() == 0
    assert await sub.get(within=0.01) is None
    # later events still arrive
    await bus.publish([event(5)])
    later = await sub.get(within=1)
    assert later is not None and later.id == "ev_5"
    sub.close()


async def test_queue_is_bounded_and_keeps_the_newest() -> None:
    bus = InProcessBus(max_queued=3)
    sub = bus.subscribe(["output.ex_1"])
    await bus.publish([event(n) for n in range(10)])
    assert sub.queue.qsize() == 3
    assert sub.dropped == 7
    got = [await sub.get(within=1) for _ in range(3)]
    assert [e.id for e in got if e is not None] == ["ev_7", "ev_8", "ev_9"]
    sub.close()


async def test_default_bound_holds_under_a_flood() -> None:
    bus = InProcessBus()
    sub = bus.subscribe(["output.ex_1"])
    await bus.publish([event(n) for n in range(10_000)])
    assert 0 < sub.queue.qsize() <= 256
    last = None
    while (got := await sub.get(within=0)) is not None:
        last = got
    assert last is not None and last.id == "ev_9999"
    sub.close()


async def test_close_releases_every_topic() -> None:
    bus = InProcessBus()
    one = bus.subscribe(["output.ex_1", "execution.ex_1"])
    two = bus.subscribe(["output.ex_1"])
    assert bus.subscriber_count("output.ex_1") == 2
    assert bus.subscriber_count("execution.ex_1") == 1
    one.close()
    assert bus.subscriber_count("output.ex_1") == 1
    assert bus.subscriber_count("execution.ex_1") == 0
    with two:
        pass
    assert bus.subscriber_count("output.ex_1") == 0
    # a closed subscription gets nothing more
    await bus.publish([event(1)])
    assert one.queue.empty() and two.queue.empty()
