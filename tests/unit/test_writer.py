"""The group-commit writer against a real SQLite database."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest
from sqlalchemy import func, select

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
