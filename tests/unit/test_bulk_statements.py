"""`execute_many`'s SQLite path (straight through the driver) and `execute_groups` (on
PostgreSQL, one pipeline for its statements, and a COPY for an insert of many rows) store
exactly what SQLAlchemy's executemany stores, and count the rows each statement changed the
same way."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from support.rows import execution_rows
from treadle.weaver.store import migrate, tables
from treadle.weaver.store.database import (
    COPY_FROM,
    Database,
    Group,
    _BulkPlan,
    execute_groups,
    execute_many,
    sync_url,
)
from treadle.weaver.store.finals import final_rows
from treadle.weaver.store.statements import EXECUTION_ASSIGN, EXECUTION_CAS_ON_NODE


async def _apply(url: str, mode: str, n: int = 12) -> tuple[list[tuple[Any, ...]], list[int]]:
    migrate.upgrade(url)
    db = Database(url)
    counts: list[int] = []
    assign = [
        {
            "_id": f"ex_{i:03}",
            "_attempt": 1,
            "node_id": "nd_1",
            "placement": {"node_id": "nd_1", "score": 0.5, "runner_ups": []},
            "isolation": "namespace",
            "pending_reason": None,
        }
        for i in range(0, 12, 2)
    ]
    start = [
        {
            "_id": f"ex_{i:03}",
            "_state": "open",
            "_attempt": 1,
            "_node": "nd_1",
            "state": "running",
            "running_at": 9.5,
        }
        for i in range(12)  # half on no node: those miss
    ]
    groups: list[Group] = [
        (tables.executions.insert(), _awkward(execution_rows(n))),
        (EXECUTION_ASSIGN, assign),
        (EXECUTION_ASSIGN, assign),  # none is open and free now
        (EXECUTION_CAS_ON_NODE, start),
    ]
    try:
        async with db.transaction() as conn:
            await conn.execute(
                tables.tenants.insert(),
                {"id": "tn_1", "name": "t", "created_at": 0.0, "allow_process_tier": False},
            )
            if mode == "groups":
                counts, _read = await execute_groups(conn, groups)
            for statement, rows in groups if mode != "groups" else ():
                if mode == "bulk":
                    counts.append(await execute_many(conn, statement, rows))
                else:
                    counts.append(int((await conn.execute(statement, rows)).rowcount))
    finally:
        await db.close()
    engine = sa.create_engine(sync_url(url))
    try:
        with engine.connect() as raw:
            rows = raw.execute(sa.text("SELECT * FROM executions ORDER BY id")).all()
    finally:
        engine.dispose()
    return [tuple(row) for row in rows], counts


# What a COPY's text format escapes or reads specially, in text and in JSON.
_AWKWARD = "".join(map(chr, range(1, 128))) + "\\N \\. \\\\ \\t é\u2028\U0001f600"


def _awkward(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for i, row in enumerate(rows):
        row["stdin"] = None if i % 3 == 1 else ("" if i % 3 == 2 else _AWKWARD[i:])
        row["args"] = {"text": _AWKWARD, "i": i, "big": 2**70}
        row["idempotency_key"] = None if i % 2 else f"\\N{i}"
    return rows


# Fewer rows than a COPY takes (one pipeline for all), and enough for the insert's COPY.
@pytest.mark.parametrize("n", [12, COPY_FROM + 4])
@pytest.mark.parametrize("store", ["sqlite", "postgresql"])
async def test_the_driver_paths_store_and_count_what_sqlalchemy_does(
    store: str, n: int, database_url: Callable[..., str]
) -> None:
    def url(name: str) -> str:
        return database_url(store, name)

    stored, counted = await _apply(url("a"), "sqlalchemy", n)
    assert len(stored) == n
    # SQLAlchemy's own count of a multi-row insert on psycopg is -1 (unknown).
    assert counted[1:] == [6, 0, 6]
    for mode in ("bulk", "groups"):
        rows, counts = await _apply(url(mode), mode, n)
        assert rows == stored, mode
        assert counts[1:] == [6, 0, 6], mode
        assert counts[0] in (n, counted[0]), mode


def test_only_a_plain_insert_goes_as_a_copy() -> None:
    """A COPY stores rows and nothing more: an insert that skips conflicts or returns what
    it stored, and any update, keep the pipeline."""
    dialect = postgresql.psycopg.dialect()  # type: ignore[attr-defined]
    keys = list(execution_rows(1)[0])
    event = ["id", "type", "tenant_id", "subject_id", "data", "created_at"]
    copy = _BulkPlan.of(tables.executions.insert(), dialect, keys).copy
    assert copy is not None and copy.startswith("COPY executions (")
    # A column left out that has a constant default is given it, as SQLAlchemy gives it.
    columns = copy.removeprefix("COPY executions (").removesuffix(") FROM STDIN").split(", ")
    assert sorted(columns) == sorted([*keys, "output_truncated"])
    # Its key's RETURNING, which SQLAlchemy adds itself, is read by no caller.
    assert _BulkPlan.of(tables.events.insert(), dialect, event).copy is not None
    for statement, columns in (
        (tables.events.insert().returning(tables.events.c.seq), event),
        (postgresql.insert(tables.executions).on_conflict_do_nothing(), keys),
        (tables.executions.insert().values(created_at=sa.func.now()), keys[:-4]),
        (EXECUTION_ASSIGN, list(_ASSIGN)),
    ):
        assert _BulkPlan.of(statement, dialect, columns).copy is None, statement
    assert _BulkPlan.of(tables.events.insert(), sqlite.dialect(), event).copy is None


async def _stored(url: str, rows: list[dict[str, Any]]) -> Database:
    """The database at `url`, migrated, holding tenant tn_1 and `rows` of executions."""
    migrate.upgrade(url)
    db = Database(url)
    async with db.transaction() as conn:
        await conn.execute(
            tables.tenants.insert(),
            {"id": "tn_1", "name": "t", "created_at": 0.0, "allow_process_tier": False},
        )
        await execute_many(conn, tables.executions.insert(), rows)
    return db


@pytest.mark.parametrize("store", ["sqlite", "postgresql"])
async def test_json_columns_read_back_what_was_written_big_integers_too(
    store: str, database_url: Callable[..., str]
) -> None:
    rows = execution_rows(6)
    # orjson alone would read the first two back as floats.
    rows[0]["args"] = {"big": 2**70, "neg": -(2**64), "in": [2**63 - 1, "9" * 30]}
    rows[1]["args"] = {"u64": 2**64 - 1, "float": 1e300, "text": "1234567890123456789012"}
    # A result that is a bare number: a column of numeric affinity would read back the
    # first of the last three as 1, and the other two as floats.
    results = [7, {"big": 2**70}, 2.5, 1.0, 2**70, -(2**64) - 1]
    for row, result in zip(rows, results, strict=True):
        row["result"] = result
    db = await _stored(database_url(store), rows)
    try:
        async with db.read() as conn:
            executions = tables.executions
            query = sa.select(executions.c.args, executions.c.result).order_by(executions.c.id)
            read = [(row.args, row.result) for row in await conn.execute(query)]
    finally:
        await db.close()
    assert read == [(row["args"], row["result"]) for row in rows]
    assert isinstance(read[0][0]["big"], int) and isinstance(read[1][0]["u64"], int)
    assert read[0][1] == 7 and isinstance(read[1][1]["big"], int)
    assert [type(result) for _args, result in read[3:]] == [float, int, int]


@pytest.mark.parametrize("n", [3, COPY_FROM])
@pytest.mark.parametrize("store", ["sqlite", "postgresql"])
async def test_a_row_that_breaks_a_constraint_fails_as_through_sqlalchemy(
    store: str, n: int, database_url: Callable[..., str]
) -> None:
    """The paths past SQLAlchemy raise its IntegrityError, as its own path does: a batch
    whose item key another replica stored meanwhile is written again, not answered 500."""
    rows = execution_rows(3)
    again = [*execution_rows(n - 1), rows[0]]  # new rows, then one whose id is taken
    for row in again[:-1]:
        row["id"] = row["id"].replace("ex_", "ex_n")
    db = await _stored(database_url(store), rows)
    try:
        for run in (
            lambda conn: execute_many(conn, tables.executions.insert(), again),
            lambda conn: execute_groups(
                conn, [(tables.executions.insert(), again), (EXECUTION_ASSIGN, [_ASSIGN])]
            ),
        ):
            with pytest.raises(sa.exc.IntegrityError):
                async with db.transaction() as conn:
                    await run(conn)
        async with db.read() as conn:
            stored = (
                await conn.execute(sa.select(sa.func.count()).select_from(tables.executions))
            ).scalar_one()
    finally:
        await db.close()
    assert stored == 3  # neither failed write left a row


_ASSIGN = {
    "_id": "ex_000",
    "_attempt": 1,
    "node_id": "nd_1",
    "placement": None,
    "isolation": "namespace",
    "pending_reason": None,
}


@pytest.mark.parametrize("store", ["sqlite", "postgresql"])
async def test_rows_inserted_together_keep_their_order(
    store: str, database_url: Callable[..., str]
) -> None:
    """A commit's events are numbered in the order they were emitted: subscribers and the
    outbox read them by that number."""
    ids = [f"ev_{i:02}" for i in reversed(range(COPY_FROM + 4))]  # enough for a COPY
    events = [
        {
            "id": id_,
            "type": "t",
            "tenant_id": None,
            "subject_id": "s",
            "data": {},
            "created_at": 1.0,
        }
        for id_ in ids
    ]
    db = await _stored(database_url(store), execution_rows(1))
    try:
        async with db.transaction() as conn:
            await execute_groups(
                conn, [(tables.events.insert(), events), (EXECUTION_ASSIGN, [_ASSIGN])]
            )
        async with db.read() as conn:
            query = sa.select(tables.events.c.id).order_by(tables.events.c.seq)
            stored = (await conn.execute(query)).scalars().all()
    finally:
        await db.close()
    assert stored == ids


# No group; a few rows and a swap (one pipeline, the read in it); enough rows for a COPY,
# which is last (the read then goes on its own).
@pytest.mark.parametrize("shape", ["read alone", "pipeline", "copy last"])
@pytest.mark.parametrize("store", ["sqlite", "postgresql"])
async def test_a_read_after_the_groups_sees_them_and_gives_what_a_read_gives(
    store: str, shape: str, database_url: Callable[..., str]
) -> None:
    """The rows a commit reads for its waiters (`finals`), sent after its groups: on
    PostgreSQL in their pipeline, through psycopg itself."""
    db = await _stored(database_url(store), execution_rows(2))
    new = execution_rows(3 if shape == "pipeline" else COPY_FROM + 1)
    for row in new:
        row["id"] = row["id"].replace("ex_", "ex_n")
    groups: list[Group] = []
    if shape != "read alone":
        groups.append((tables.executions.insert(), new))
    if shape == "pipeline":
        groups.append((EXECUTION_ASSIGN, [_ASSIGN]))
    wanted = ["ex_000", "ex_001", new[0]["id"], new[-1]["id"]]
    try:
        async with db.transaction() as conn:
            counts, read = await execute_groups(
                conn, groups, (final_rows(db.dialect), {"_ids": wanted})
            )
        async with db.read() as conn:
            query = sa.select(tables.executions).where(tables.executions.c.id.in_(wanted))
            stored = {row.id: row._asdict() for row in await conn.execute(query)}
    finally:
        await db.close()
    assert counts == [len(rows) for _statement, rows in groups]
    expected_ids = wanted if shape != "read alone" else wanted[:2]
    assert sorted(row.id for row in read) == sorted(expected_ids)
    assert {row.id: row._asdict() for row in read} == stored
    if shape == "pipeline":
        assert stored["ex_000"]["node_id"] == "nd_1"  # the swap before it, seen
