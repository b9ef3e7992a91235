"""Statements marked `direct` (sent through psycopg itself on PostgreSQL) store and read
exactly what SQLAlchemy's own path does: the same rows, the same attributes, the same
counts, JSON and big integers alike."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import CursorResult

from support.rows import execution_rows
from treadle.weaver.store import migrate, statements, tables
from treadle.weaver.store.database import Database, execute_groups, execute_many


def _plain(statement: Any) -> Any:
    return statement.execution_options(treadle_direct=False)


async def _session(db: Database, direct: bool) -> tuple[list[Any], list[tuple[Any, ...]]]:
    """A run of the marked statements (or of the same, unmarked): what each gave, and the
    table after."""
    seen: list[Any] = []

    async def run(conn: Any, statement: Any, parameters: dict[str, Any]) -> Any:
        result = await conn.execute(statement if direct else _plain(statement), parameters)
        if direct and db.dialect == "postgresql":
            assert not isinstance(result, CursorResult)  # it took psycopg's own path
        return result

    async with db.transaction() as conn:
        await conn.execute(
            tables.tenants.insert(),
            {"id": "tn_1", "name": "t", "created_at": 0.0, "allow_process_tier": False},
        )
        rows = [row | {"idempotency_key": f"k{i}"} for i, row in enumerate(execution_rows(3))]
        rows[0]["args"]["big"] = 2**70
        await execute_many(conn, tables.executions.insert(), rows)
    async with db.transaction() as conn:
        assign = {
            "_id": "ex_000",
            "_attempt": 1,
            "node_id": "nd_1",
            "placement": {"node_id": "nd_1", "score": 0.5},
            "isolation": "namespace",
            "pending_reason": None,
        }
        for _ in range(2):  # the second finds it assigned: no row
            seen.append((await run(conn, statements.EXECUTION_ASSIGN, assign)).rowcount)
        for result in (1.0, 2**70, {"r": [None, 1.5]}):
            swap = {"_id": "ex_000", "_state": "open", "_attempt": 1, "result": result}
            seen.append((await run(conn, statements.EXECUTION_CAS, swap)).rowcount)
        on_node = {"_id": "ex_000", "_state": "open", "_attempt": 1, "_node": "nd_2"}
        changed = await run(conn, statements.EXECUTION_CAS_ON_NODE, on_node | {"state": "x"})
        seen.append(changed.rowcount)  # another node's: no row
        counted = {"_id": "ex_001", "_attempt": 1, "_node": None, "output_bytes": 2**40}
        seen.append((await run(conn, statements.OUTPUT_COUNT_ON_NODE, counted)).rowcount)
        counted = {"_id": "ex_001", "_attempt": 1, "output_bytes": 2**40, "output_truncated": True}
        seen.append((await run(conn, statements.EXECUTION_UPDATE_ATTEMPT, counted)).rowcount)
        insert = db.insert_ignoring_conflicts(tables.executions, tables.executions.c.id)
        for _ in range(2):  # stored, then there before: no row
            fresh = execution_rows(1)[0] | {"id": "ex_new", "result": None, "placement": None}
            seen.append((await run(conn, insert, fresh)).scalar_one_or_none())
    async with db.read() as conn:
        by_id = await run(conn, statements.EXECUTION_BY_ID, {"_id": "ex_000"})
        row = by_id.one()
        seen.append(
            (tuple(row), row.result, row.placement, row.cancel_requested, dict(row._mapping))
        )
        mine = {"_id": "ex_000", "_tenant": "tn_2"}
        seen.append((await run(conn, statements.EXECUTION_BY_TENANT_AND_ID, mine)).first())
        keyed = {"_tenant": "tn_1", "_key": "k2"}
        key = await run(conn, statements.EXECUTION_BY_IDEMPOTENCY_KEY, keyed)
        seen.append([r.id for r in key])
        fence = await run(conn, statements.EXECUTION_FENCE, {"_id": "ex_000"})
        seen.append(fence.scalar_one())
        output = await run(conn, statements.OUTPUT_STATE, {"_id": "ex_001", "_attempt": 1})
        seen.append(tuple(output.one()))
        none = await run(conn, statements.EXECUTION_FENCE, {"_id": "ex_999"})
        seen.append(none.scalars().all())
        # A value left out is refused, not sent as NULL (which would read as a lost race).
        with pytest.raises(sa.exc.StatementError, match="_id"):
            await run(conn, statements.EXECUTION_FENCE, {})
        table = [tuple(r) for r in await conn.execute(sa.select(tables.executions).order_by("id"))]
    return seen, table


@pytest.mark.parametrize("store", ["sqlite", "postgresql"])
async def test_a_direct_statement_gives_what_sqlalchemy_gives(
    store: str, database_url: Callable[..., str]
) -> None:
    results = []
    for direct in (True, False):
        url = database_url(store, f"direct-{direct}")
        migrate.upgrade(url)
        db = Database(url)
        try:
            results.append(await _session(db, direct))
        finally:
            await db.close()
    (seen, table), (expected, expected_table) = results
    assert seen == expected and table == expected_table
    # Assigned once; each swap of the result found the row (its state stays open); none
    # on another node, or on no node.
    assert seen[:10] == [1, 0, 1, 1, 1, 0, 0, 1, "ex_new", None]
    _row, result, placement, cancel, mapping = seen[10]
    assert result == {"r": [None, 1.5]} and placement["score"] == 0.5 and cancel is False
    assert mapping["args"]["big"] == 2**70 and mapping["node_id"] == "nd_1"
    assert seen[11:] == [None, ["ex_002"], 1, (1, None, 2**40, True, None), []]


async def test_a_connection_that_died_under_psycopg_leaves_the_pool(
    database_url: Callable[..., str],
) -> None:
    url = database_url("postgresql")
    migrate.upgrade(url)
    db = Database(url)
    pid = sa.text("SELECT pg_backend_pid()")
    kill = sa.text("SELECT pg_terminate_backend(:pid)")
    swap = {"_id": "ex_000", "_state": "open", "_attempt": 1, "state": "running"}
    ways = {
        "one statement": (db.transaction, lambda c: c.execute(statements.EXECUTION_CAS, swap)),
        "a pipeline": (
            db.transaction,
            lambda c: execute_groups(
                c, [(statements.EXECUTION_CAS, [swap]), (statements.EXECUTION_CAS, [swap])]
            ),
        ),
        "a read": (db.read, lambda c: c.execute(statements.EXECUTION_FENCE, {"_id": "ex_000"})),
    }
    try:
        for way, (open_, send) in ways.items():
            async with open_() as conn:
                dead = (await conn.execute(pid)).scalar_one()
            async with db.transaction() if open_ == db.read else db.read() as other:
                await other.execute(kill, {"pid": dead})
            # The pool's one connection, dead: psycopg's own path is the first to find it.
            with pytest.raises(sa.exc.OperationalError):
                async with open_() as conn:
                    await send(conn)
            async with open_() as conn:  # a new connection, not the dead one
                assert (await conn.execute(pid)).scalar_one() != dead, way
    finally:
        await db.close()
