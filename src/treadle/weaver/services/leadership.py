"""Which Weaver replica reconciles the fleet (marks nodes down, expires unschedulable work).

On PostgreSQL, the replica holding a session advisory lock leads. The lock lives on a
connection of its own; when that replica dies, PostgreSQL ends its session, the lock is
free, and the next replica to ask takes it. Two leaders for a moment (a partition that the
old one has not noticed yet) would be harmless: every change they make is compare-and-swap.
SQLite is one Weaver per database file, which always leads.
"""

from __future__ import annotations

import logging
from typing import Protocol

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, create_async_engine
from sqlalchemy.pool import NullPool

__all__ = ["AdvisoryLock", "Leadership", "SoleLeader", "leadership_for"]

log = logging.getLogger(__name__)
# Any fixed 64-bit number; PostgreSQL scopes advisory locks to the database.
_LOCK_KEY = 0x7472_6561_646C_6531


class Leadership(Protocol):
    async def held(self) -> bool:
        """Whether this replica leads now; tries to become leader when nobody does."""

    async def release(self) -> None: ...


class SoleLeader:
    async def held(self) -> bool:
        return True

    async def release(self) -> None:
        return None


class AdvisoryLock:
    def __init__(self, url: str) -> None:
        self._engine = create_async_engine(url, poolclass=NullPool)
        # kept open while following too, so asking again costs a statement, not a connection
        self._conn: AsyncConnection | None = None
        self._leading = False

    async def held(self) -> bool:
        try:
            if self._conn is None:
                conn = await self._engine.connect()
                self._conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
            if self._leading:
                await self._conn.execute(text("SELECT 1"))
            else:
                self._leading = bool(
                    (
                        await self._conn.execute(
                            text("SELECT pg_try_advisory_lock(:key)"), {"key": _LOCK_KEY}
                        )
                    ).scalar_one()
                )
        except Exception as exc:
            if self._leading:
                log.warning("lost the database session that held leadership: %s", exc)
            else:
                log.warning("cannot ask the database for leadership: %s", exc)
            await self._drop()
        return self._leading

    async def _drop(self) -> None:
        conn, self._conn, self._leading = self._conn, None, False
        if conn is not None:
            try:
                await conn.close()
            except Exception:
                await conn.invalidate()

    async def release(self) -> None:
        await self._drop()
        await self._engine.dispose()


def leadership_for(url: str, dialect: str) -> Leadership:
    return AdvisoryLock(url) if dialect == "postgresql" else SoleLeader()
