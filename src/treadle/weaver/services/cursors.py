"""Opaque list cursors: the id of the last row of a page, which must carry the listed kind's
prefix when it comes back; and how far one filtered page reads.

A tenant's rows are listed newest first through the index on (tenant, id). A filter that
matches few of them (a rare state, a function or label nothing has) would have one request
read all of the tenant's history, which only grows: a page reads at most `SCAN_WINDOW` of
the tenant's rows from its cursor on, and where it stops short of a full page its cursor
goes on from the last row it read. Such a page may hold fewer items than asked, none even,
with a cursor; a client follows cursors until there is none (the SDKs and the CLI do).
"""

from __future__ import annotations

import base64
from typing import Any

from sqlalchemy import ColumnElement, Subquery, Table, func, select

from treadle.domain.errors import InvalidRequest

__all__ = ["SCAN_WINDOW", "ScanWindow", "decode_cursor", "encode_cursor"]

SCAN_WINDOW = 10_000


def encode_cursor(row_id: str) -> str:
    return base64.urlsafe_b64encode(row_id.encode()).decode()


def decode_cursor(cursor: str, prefix: str) -> str:
    """The id `cursor` stands for; 422 when it is not a cursor of ids starting `prefix_`."""
    try:
        value = base64.b64decode(cursor.encode(), altchars=b"-_", validate=True).decode()
    except (ValueError, UnicodeDecodeError):
        value = ""
    if not value.startswith(f"{prefix}_"):
        raise InvalidRequest(
            "cursor is not one this API returned",
            details=[{"loc": ["query", "cursor"], "msg": "invalid cursor"}],
        )
    return value


class ScanWindow:
    """The next `size` rows of `table` within `bounds` (one tenant's, below the cursor),
    newest first: what a filtered page reads (`rows`, a subquery to filter and order), and
    where the next page goes on from when this one is not full (`cursor_after`). The
    window's own LIMIT keeps the page's filter out of it (SQL does not push a condition
    into a subquery with a LIMIT): at most `size` rows are read, whatever the filter, and
    fewer where the page fills first."""

    def __init__(self, table: Table, bounds: list[ColumnElement[bool]], size: int) -> None:
        self._size = size
        newest = select(table).where(*bounds).order_by(table.c.id.desc())
        self.rows: Subquery = newest.limit(size).subquery()
        self._ids = select(table.c.id).where(*bounds).order_by(table.c.id.desc()).limit(size)

    async def end(self, conn: Any) -> str | None:
        """The id of the window's last row when it was full (rows may lie beyond it), else
        None."""
        ids = self._ids.subquery().c[0]
        read, last = (await conn.execute(select(func.count(), func.min(ids)))).one()
        return str(last) if read >= self._size else None

    async def cursor_after(self, conn: Any) -> str | None:
        """The cursor past the window when it was full, else None."""
        last = await self.end(conn)
        return None if last is None else encode_cursor(last)
