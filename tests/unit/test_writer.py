"""The group-commit writer against a real SQLite database."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest
from sqlalchemy import bindparam, func, select, update

from treadle.domain.errors import Unavailable
from treadle.weaver.events.bus import BusEvent, InProcessBus
from treadle.weaver.store import migrate, tables
from treadle.weaver.store.database import Database
from treadle.weaver.store.writer import Tx, WriteFn, Writer


class FailingBus(InProcessBus):
    async def publish(self, events: Sequence[BusEvent]) -> None:
        raise RuntimeError("the bus is down")


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    url = f"sqlite:///{tmp_path / 'w.db'}"
    migrate.upgrade(url)
    database = Database(url)
    yield database
    await database.close()


async def _tenants(db: Database) -> int:
    async with db.read() as conn:
        return int(
            (await conn.execute(select(func.count()).select_from(tables.tenants))).scalar_one()
        )


def _insert(name: str, calls: list[str]) -> WriteFn[str]:
    async def write(tx: Tx) -> str:
        calls.append(name)
        await tx.conn.execute(tables.tenants.insert().values(id=name, name=name, created_at=0.0))
        tx.emit("tenant.created", name, None, {})
        return name

    return write


async def test_a_failure_after_commit_neither_fails_nor_repeats_the_batch(db: Database) -> None:
    writer = Writer(db, FailingBus())
    writer.start()
    calls: list[str] = []
    try:
        futures = [writer.submit(_insert(f"t{i}", calls)) for i in range(3)]
        assert [await f for f in futures] == ["t0", "t1", "t2"]
    finally:
        await writer.stop()
    assert calls == ["t0", "t1", "t2"]  # each write ran once
    assert await _tenants(db) == 3


async def test_one_failing_write_fails_alone(db: Database) -> None:
    writer = Writer(db, InProcessBus())
    writer.start()
    calls: list[str] = []

    async def broken(tx: Tx) -> None:
        raise ValueError("bad write")

    try:
        good = writer.submit(_insert("a", calls))
        bad = writer.submit(broken)
        other = writer.submit(_insert("b", calls))
        assert await good == "a" and await other == "b"
        with pytest.raises(ValueError, match="bad write"):
            await bad
    finally:
        await writer.stop()
    assert await _tenants(db) == 2
    async with db.read() as conn:
        events = (await conn.execute(select(func.count()).select_from(tables.events))).scalar_one()
    assert events == 2  # the rolled-back batch left no event behind


async def test_a_write_waits_for_a_lock_held_elsewhere_and_reads_go_on(
    db: Database, tmp_path: Path
) -> None:
    import asyncio
    import sqlite3

    writer = Writer(db, InProcessBus())
    writer.start()
    calls: list[str] = []
    # as in a running Weaver: both connections open (the file is in WAL mode from then on)
    assert await writer.submit(_insert("early", calls)) == "early"
    assert await _tenants(db) == 1
    other = sqlite3.connect(tmp_path / "w.db", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another process holding the write lock
    try:
        pending = writer.submit(_insert("late", calls))
        for _ in range(2000):  # until the writer has found the lock taken
            if writer.busy_waits:
                break
            await asyncio.sleep(0.005)
        assert writer.busy_waits
        assert await _tenants(db) == 1  # the loop is free: reads go on
        assert not pending.done()
        other.execute("ROLLBACK")
        assert await pending == "late"
    finally:
        other.close()
        await writer.stop()
    assert await _tenants(db) == 2


@pytest.fixture(params=["sqlite", "postgresql"])
async def any_db(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Database]:
    """On each store: their drivers count the rows an `executemany` changed each their way."""
    if request.param == "postgresql":
        url = request.getfixturevalue("postgres").create_database()
    else:
        url = f"sqlite:///{tmp_path / 'swaps.db'}"
    migrate.upgrade(url)
    database = Database(url)
    yield database
    await database.close()


# A compare-and-swap on a tenant's name, as `transitions` does on an execution's state.
_RENAME = update(tables.tenants).where(
    tables.tenants.c.id == bindparam("_id"), tables.tenants.c.name == bindparam("_old")
)


def _swap(tenant: str, old: str, new: str, seen: list[str] | None = None) -> WriteFn[bool]:
    async def write(tx: Tx) -> bool:
        swapped = await tx.swap(tenant, _RENAME, {"_id": tenant, "_old": old, "name": new})
        if swapped:
            tx.emit("tenant.renamed", tenant, None, {"name": new})
        if seen is not None:  # what a statement after the swap sees
            query = select(tables.tenants.c.name).where(tables.tenants.c.id == tenant)
            seen.append((await tx.conn.execute(query)).scalar_one())
        return swapped

    return write


async def _names(db: Database) -> dict[str, str]:
    async with db.read() as conn:
        rows = await conn.execute(select(tables.tenants.c.id, tables.tenants.c.name))
        return {row.id: row.name for row in rows}


async def _run_batch(writer: Writer, writes: list[WriteFn[bool]]) -> list[bool]:
    # Queued before the writer's task first runs: one batch.
    futures = [writer.submit(write) for write in writes]
    writer.start()
    return [await future for future in futures]


async def test_deferred_swaps_that_all_hit_commit_together_in_order(any_db: Database) -> None:
    db = any_db
    seed = Writer(db, InProcessBus())
    seed.start()
    await asyncio.gather(*(seed.run(_insert(f"t{i}", [])) for i in range(3)))
    await seed.stop()
    writer, seen = Writer(db, InProcessBus()), []
    try:
        results = await _run_batch(
            writer,
            [
                _swap("t0", "t0", "a"),
                _swap("t1", "t1", "b"),
                _swap("t0", "a", "c"),  # the same row again: after the first
                _swap("t2", "t2", "d", seen),  # then read: the swaps before it are there
            ],
        )
    finally:
        await writer.stop()
    assert results == [True, True, True, True]
    assert seen == ["d"]
    assert await _names(db) == {"t0": "c", "t1": "b", "t2": "d"}
    assert writer.swaps_missed == 0


async def test_a_swap_that_misses_makes_the_batch_run_again_write_by_write(
    any_db: Database,
) -> None:
    db = any_db
    seed = Writer(db, InProcessBus())
    seed.start()
    await asyncio.gather(*(seed.run(_insert(f"t{i}", [])) for i in range(3)))
    await seed.stop()
    bus = InProcessBus()
    events = bus.subscribe(["tenant.t0", "tenant.t1", "tenant.t2"], max_queued=0)
    writer = Writer(db, bus)
    try:
        results = await _run_batch(
            writer,
            [
                _swap("t0", "t0", "a"),
                _swap("t1", "not-its-name", "b"),  # misses
                _swap("t2", "t2", "c"),
            ],
        )
    finally:
        await writer.stop()
    assert results == [True, False, True]
    assert writer.swaps_missed == 1
    assert await _names(db) == {"t0": "a", "t1": "t1", "t2": "c"}
    published = []
    while (event := await events.get(within=0)) is not None:
        published.append(event.subject_id)
    assert sorted(published) == ["t0", "t2"]  # nothing of the rolled-back first try


def _insert_later(name: str, then_swap: bool = False) -> WriteFn[bool]:
    async def write(tx: Tx) -> bool:
        await tx.insert_later(_INSERT_TENANT, {"id": name, "name": name, "created_at": 0.0})
        if then_swap:  # a swap of the row just inserted goes after it
            return await tx.swap(name, _RENAME, {"_id": name, "_old": name, "name": name + "!"})
        return True

    return write


_INSERT_TENANT = tables.tenants.insert()


async def test_deferred_inserts_go_out_before_the_swaps_and_statements_after_them(
    any_db: Database,
) -> None:
    db = any_db
    writer, seen = Writer(db, InProcessBus()), []

    async def count_then(tx: Tx) -> bool:
        seen.append(
            (await tx.conn.execute(select(func.count()).select_from(tables.tenants))).scalar_one()
        )
        return True

    try:
        results = await _run_batch(
            writer,
            [_insert_later("t0"), _insert_later("t1", then_swap=True), count_then],
        )
    finally:
        await writer.stop()
    assert results == [True, True, True]
    assert seen == [2]
    assert await _names(db) == {"t0": "t0", "t1": "t1!"}
    assert writer.swaps_missed == 0


async def test_a_deferred_insert_that_fails_fails_alone(any_db: Database) -> None:
    db = any_db
    writer = Writer(db, InProcessBus())
    try:
        # With a swap besides the inserts: on PostgreSQL, all in one pipeline.
        writes = [_insert_later("t0"), _insert_later("t0"), _insert_later("t1", then_swap=True)]
        futures = [writer.submit(write) for write in writes]
        writer.start()
        outcomes = await asyncio.gather(*futures, return_exceptions=True)
    finally:
        await writer.stop()
    assert outcomes[0] is True and outcomes[2] is True
    assert isinstance(outcomes[1], Exception)  # the second row of one key
    assert await _names(db) == {"t0": "t0", "t1": "t1!"}


async def test_what_a_write_did_in_memory_is_undone_when_its_transaction_does_not_commit(
    db: Database,
) -> None:
    held: list[str] = []

    def holding(name: str, fail: bool = False) -> WriteFn[str]:
        async def write(tx: Tx) -> str:
            held.append(name)  # as placement reserves a node's capacity
            tx.undo.append(lambda: held.remove(name))
            if fail:
                raise RuntimeError("this write fails")
            await tx.conn.execute(
                tables.tenants.insert().values(id=name, name=name, created_at=0.0)
            )
            return name

        return write

    writer = Writer(db, InProcessBus())
    try:
        futures = [writer.submit(holding("a")), writer.submit(holding("b", fail=True))]
        writer.start()
        outcomes = await asyncio.gather(*futures, return_exceptions=True)
    finally:
        await writer.stop()
    # The batch failed and ran again write by write: "a" once held, "b" not at all.
    assert outcomes[0] == "a" and isinstance(outcomes[1], RuntimeError)
    assert held == ["a"]
    assert await _tenants(db) == 1


def _holding(gate: asyncio.Event, entered: asyncio.Event) -> WriteFn[None]:
    """A write that keeps the writer busy until `gate` is set."""

    async def held(tx: Tx) -> None:
        entered.set()
        await gate.wait()

    return held


async def test_a_writer_stopped_fails_the_writes_it_will_not_run(db: Database) -> None:
    writer = Writer(db, InProcessBus())
    writer.start()
    gate, entered = asyncio.Event(), asyncio.Event()
    held = _holding(gate, entered)
    in_flight = writer.submit(held)
    await entered.wait()
    queued = writer.submit(_insert("t0", []))
    await writer.stop()
    for future in (in_flight, queued):
        with pytest.raises(Unavailable):
            async with asyncio.timeout(30):  # a bound, so that a future never failed shows
                await future
    assert await _tenants(db) == 0


async def test_a_caller_cancelled_twice_still_waits_for_its_write_to_be_decided(
    db: Database,
) -> None:
    """What `decided` is for: a lock held across the write is let go only once the write is
    in the store (or failed)."""
    writer = Writer(db, InProcessBus())
    writer.start()
    gate, entered = asyncio.Event(), asyncio.Event()
    held = _holding(gate, entered)
    try:
        writer.submit(held)
        await entered.wait()
        caller = asyncio.create_task(writer.decided(_insert("t0", [])))
        await asyncio.sleep(0)  # the caller's write is queued
        caller.cancel()
        await asyncio.sleep(0)
        caller.cancel()
        waiting = asyncio.ensure_future(asyncio.wait({caller}))
        await asyncio.sleep(0)
        assert not caller.done()
        gate.set()
        await waiting
        assert caller.cancelled()
        assert await _tenants(db) == 1  # its write was stored before it let go
    finally:
        await writer.stop()
