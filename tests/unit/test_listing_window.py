"""A filtered listing reads a bounded window of the tenant's rows a page: a filter that
matches little cannot make one request read all of a tenant's history. A page that stops at
the window's end says where to go on, and following the cursors finds every match once."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from support.rows import execution_rows
from support.weaver import running_weaver
from treadle.domain.execution import ExecutionState
from treadle.domain.sandbox import SandboxStatus
from treadle.weaver.core import Weaver
from treadle.weaver.services import executions, sandboxes
from treadle.weaver.store import tables

WINDOW = 5
# Rows 0 to 22 of the tenant, newest last; the filter matches these.
MATCHES = (1, 12, 13, 21)
# Windows of 5 from the newest: 22 to 18, 17 to 13, 12 to 8, 7 to 3, then the last three rows.
PAGES = [[21], [13], [12], [], [1]]


async def _pages(page: Callable[..., Any], tenant: str, **filters: Any) -> list[list[int]]:
    seen: list[list[int]] = []
    cursor = None
    for _ in range(20):
        items, cursor = await page(tenant, limit=2, cursor=cursor, **filters)
        seen.append([int(item["id"].rsplit("_", 1)[1]) for item in items])
        if cursor is None:
            return seen
    raise AssertionError(f"no last page after {seen}")


@pytest.fixture
async def weaver(
    request: pytest.FixtureRequest,
    database_url: Callable[..., str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Any:
    monkeypatch.setattr(executions, "SCAN_WINDOW", WINDOW)
    monkeypatch.setattr(sandboxes, "SCAN_WINDOW", WINDOW)
    monkeypatch.setattr(sandboxes, "_PART", 2)  # a window read in parts: 2 rows, then 3
    async with running_weaver(tmp_path / "weaver", database_url(request.param)) as started:
        yield started


@pytest.mark.parametrize("weaver", ["sqlite", "postgresql"], indirect=True)
async def test_a_filtered_execution_listing_reads_a_window_a_page(weaver: Weaver) -> None:
    tenant = (await weaver.auth.create_tenant("t"))[0]["id"]
    other = (await weaver.auth.create_tenant("o"))[0]["id"]
    rows = []
    for i, row in enumerate(execution_rows(23)):
        failed = i in MATCHES
        row |= {"id": f"ex_{i:03}", "tenant_id": tenant, "idempotency_key": None}
        row |= {"state": "timeout" if failed else "success", "function": "g" if failed else "f"}
        rows.append(row)
        # Another tenant's matching rows in between: not the tenant's, and not read for it.
        rows.append(row | {"id": f"ex_{i:03}o", "tenant_id": other, "state": "timeout"})
    async with weaver.db.transaction() as conn:
        await conn.execute(tables.executions.insert(), rows)

    page = weaver.executions.page
    assert await _pages(page, tenant, state=ExecutionState.TIMEOUT) == PAGES
    assert await _pages(page, tenant, function="g") == PAGES
    # Unfiltered, a page is full until the last.
    assert await _pages(page, tenant) == [[22 - 2 * i, 21 - 2 * i] for i in range(11)] + [[0]]


@pytest.mark.parametrize("weaver", ["sqlite", "postgresql"], indirect=True)
async def test_a_filtered_sandbox_listing_reads_a_window_a_page(weaver: Weaver) -> None:
    tenant = (await weaver.auth.create_tenant("t"))[0]["id"]
    rows = [
        {
            "id": f"sbx_{i:03}",
            "tenant_id": tenant,
            "status": "stopped" if i in MATCHES else "failed",
            "desired": "stopped",
            "incarnation": 1,
            "spec": {},
            "metadata": {"team": "a" if i in MATCHES else "b"},
            "created_at": float(i),
            "updated_at": float(i),
        }
        for i in range(23)
    ]
    async with weaver.db.transaction() as conn:
        await conn.execute(tables.sandboxes.insert(), rows)

    page = weaver.sandboxes.page
    assert await _pages(page, tenant, metadata={"team": "a"}) == PAGES
    assert await _pages(page, tenant, statuses=[SandboxStatus.STOPPED]) == PAGES
    stopped_b = {"statuses": [SandboxStatus.STOPPED], "metadata": {"team": "b"}}
    assert await _pages(page, tenant, **stopped_b) == [[], [], [], [], []]
