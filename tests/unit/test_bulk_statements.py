"""`execute_many`'s SQLite path (straight through the driver) stores exactly what SQLAlchemy's
executemany stores, and counts the rows it changed the same way."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from treadle.weaver.store import migrate, tables
from treadle.weaver.store.database import Database, execute_many
from treadle.weaver.store.statements import EXECUTION_ASSIGN, EXECUTION_CAS_ON_NODE


def _executions(n: int) -> list[dict[str, Any]]:
    return [
        {
            "id": f"ex_{i:03}",
            "tenant_id": "tn_1",
            "function": "f",
            "version": 1,
            "state": "open",
            "attempt": 1,
            "max_attempts": 2,
            "args": {"i": i, "text": "é\u2028\"'", "nested": [1, None, {"x": 1.5}]},
            "stdin": None if i % 2 else "in",
            "idempotency_key": None,
            "cancel_requested": False,
            "resources": {"cpu_millicores": 10},
            "isolation": None,
            "placement": None if i % 3 else {"requested_strategy": "balanced"},
            "created_at": 1.25 + i,
            "queued_at": 1.25 + i,
            "batch_id": "bt_1",
            "batch_index": i,
        }
        for i in range(n)
    ]


async def _apply(path: Path, bulk: bool) -> tuple[list[tuple[Any, ...]], list[int]]:
    url = f"sqlite:///{path}"
    migrate.upgrade(url)
    db = Database(url)
    counts = []

    async def many(statement: Any, rows: list[dict[str, Any]]) -> int:
        if bulk:
            return await execute_many(conn, statement, rows)
        return int((await conn.execute(statement, rows)).rowcount)

    try:
        async with db.transaction() as conn:
            await conn.execute(
                tables.tenants.insert(),
                {"id": "tn_1", "name": "t", "created_at": 0.0, "allow_process_tier": False},
            )
            counts.append(await many(tables.executions.insert(), _executions(12)))
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
            counts.append(await many(EXECUTION_ASSIGN, assign))
            counts.append(await many(EXECUTION_ASSIGN, assign))  # none is open and free now
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
            counts.append(await many(EXECUTION_CAS_ON_NODE, start))
    finally:
        await db.close()
    with sqlite3.connect(path) as raw:
        rows = raw.execute("SELECT * FROM executions ORDER BY id").fetchall()
    return rows, counts


async def test_the_driver_path_stores_and_counts_what_sqlalchemy_does(tmp_path: Path) -> None:
    through_sqlalchemy = await _apply(tmp_path / "a.db", bulk=False)
    through_driver = await _apply(tmp_path / "b.db", bulk=True)
    assert through_driver == through_sqlalchemy
    rows, counts = through_driver
    assert counts == [12, 6, 0, 6]
    assert len(rows) == 12
