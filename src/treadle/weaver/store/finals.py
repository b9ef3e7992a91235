"""The rows of executions as the transaction that ended them left them, for the requests on
this replica that wait for that end (`?wait`).

A waiter woken by an execution's end used to read the row again, a statement and a read
connection's turn of its own. The writer reads instead, in the transaction that ends the
executions someone here waits for, all of them in one statement (`Writer`), and hands the
rows over once it has committed. Rows are kept only while someone waits for them; a waiter
that finds none (the end came through another replica, or it timed out meanwhile) reads.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import any_, bindparam, select

from treadle.weaver.store import tables
from treadle.weaver.store.database import direct

__all__ = ["Finals", "final_rows"]

_E = tables.executions
# The same columns a read of one execution gives (`statements.EXECUTION_BY_ID`). On
# PostgreSQL one array parameter (psycopg makes the list one), so that the statement is
# compiled once and goes through psycopg itself (`direct`); SQLite has no arrays.
_ANY_OF = direct(select(_E).where(_E.c.id == any_(bindparam("_ids"))))
_IN = select(_E).where(_E.c.id.in_(bindparam("_ids", expanding=True)))


def final_rows(dialect: str) -> Any:
    """The statement that reads the executions `_ids` (a list) on `dialect`."""
    return _ANY_OF if dialect == "postgresql" else _IN


class Finals:
    def __init__(self) -> None:
        self._waiters: dict[str, int] = {}
        self._rows: dict[str, Any] = {}

    def watch(self, execution_id: str) -> None:
        self._waiters[execution_id] = self._waiters.get(execution_id, 0) + 1

    def unwatch(self, execution_id: str) -> None:
        left = self._waiters.get(execution_id, 0) - 1
        if left > 0:
            self._waiters[execution_id] = left
        else:
            self._waiters.pop(execution_id, None)
            self._rows.pop(execution_id, None)

    def wants(self, execution_id: str) -> bool:
        return execution_id in self._waiters

    def keep(self, rows: list[Any]) -> None:
        """Rows read by a transaction that has committed; a later one replaces an earlier."""
        for row in rows:
            if row.id in self._waiters:
                self._rows[row.id] = row

    def take(self, execution_id: str, tenant_id: str) -> Any | None:
        """The row last kept for `execution_id`, if it is `tenant_id`'s; it stays for the
        other waiters until the last of them goes."""
        row = self._rows.get(execution_id)
        if row is None or row.tenant_id != tenant_id:
            return None
        return row

    def __len__(self) -> int:
        return len(self._rows)
