"""A request waiting for an execution to end gets the row the transaction that ended it read,
the same row a read gives, without a read of its own; rows are kept only while someone waits,
only for the tenant that owns them, and never from a transaction that did not commit."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from support.rows import execution_rows
from support.weaver import running_weaver
from treadle.domain.execution import Event
from treadle.weaver.core import Weaver
from treadle.weaver.services.transitions import Expected, transition
from treadle.weaver.store import tables
from treadle.weaver.store.finals import Finals
from treadle.weaver.store.writer import Tx

NODE = "nd_1"


@pytest.fixture(params=["sqlite", "postgresql"])
async def weaver(
    request: pytest.FixtureRequest, database_url: Callable[..., str], tmp_path: Path
) -> Any:
    async with running_weaver(tmp_path / "weaver", database_url(request.param)) as started:
        yield started


async def _running(weaver: Weaver, n: int = 1) -> tuple[str, list[Any]]:
    tenant = (await weaver.auth.create_tenant("t"))[0]["id"]
    rows = [
        row | {"id": f"ex_fin{i}", "tenant_id": tenant, "batch_id": None, "batch_index": None}
        for i, row in enumerate(execution_rows(n))
    ]
    for row in rows:
        row.update(state="running", node_id=NODE, running_at=row["created_at"] + 1)

    async def insert(tx: Tx) -> None:
        await tx.conn.execute(tables.executions.insert(), rows)

    await weaver.writer.run(insert)
    return tenant, [await weaver.executions.get(tenant, row["id"]) for row in rows]


def _ends(tenant: str, execution_id: str, node: str = NODE, exit_code: int = 0) -> Any:
    """A node's report that the attempt ended, as reports store it: a deferred swap."""

    async def write(tx: Tx) -> bool:
        expected = Expected(execution_id, tenant, "running", 1, node)
        event = Event.SUCCEED if exit_code == 0 else Event.FAIL
        return await transition(
            tx, expected, event, exit_code=exit_code, result={"sum": 13}, duration_ms=4
        )

    return write


def _reads(weaver: Weaver, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    reads: list[str] = []
    get = weaver.executions.get

    async def counted(tenant_id: str, execution_id: str) -> Any:
        reads.append(execution_id)
        return await get(tenant_id, execution_id)

    monkeypatch.setattr(weaver.executions, "get", counted)
    return reads


def _watching(finals: Finals, waiters: int, monkeypatch: pytest.MonkeyPatch) -> asyncio.Event:
    """Set once `waiters` waits have begun to watch."""
    began, watch = asyncio.Event(), finals.watch
    count = [0]

    def counted(execution_id: str) -> None:
        watch(execution_id)
        count[0] += 1
        if count[0] == waiters:
            began.set()

    monkeypatch.setattr(finals, "watch", counted)
    return began


async def test_a_waiter_gets_the_ended_row_as_a_read_gives_it_without_reading(
    weaver: Weaver, monkeypatch: pytest.MonkeyPatch
) -> None:
    tenant, (row,) = await _running(weaver)
    finals = weaver.executions._finals
    reads = _reads(weaver, monkeypatch)
    began = _watching(finals, 2, monkeypatch)
    waiters = [
        asyncio.create_task(weaver.executions.wait(tenant, row.id, 30.0, row)) for _ in range(2)
    ]
    await began.wait()
    assert await weaver.writer.run(_ends(tenant, row.id)) is True
    ended = await asyncio.gather(*waiters)
    assert reads == []
    stored = await weaver.executions.get(tenant, row.id)
    for got in ended:
        assert got._asdict() == stored._asdict()
    assert stored.state == "success" and stored.exit_code == 0 and stored.ended_at is not None
    assert stored.result == {"sum": 13}
    assert len(finals) == 0 and not finals.wants(row.id)


async def test_an_end_that_did_not_apply_or_that_nobody_waits_for_keeps_nothing(
    weaver: Weaver, monkeypatch: pytest.MonkeyPatch
) -> None:
    tenant, (row, other) = await _running(weaver, 2)
    finals = weaver.executions._finals
    reads = _reads(weaver, monkeypatch)
    began = _watching(finals, 1, monkeypatch)
    waiter = asyncio.create_task(weaver.executions.wait(tenant, row.id, 30.0, row))
    await began.wait()
    # A report from a node the attempt is not on: the deferred swap misses, the batch is run
    # again write by write, and this write ends nothing.
    assert await weaver.writer.run(_ends(tenant, row.id, node="nd_other")) is False
    assert len(finals) == 0
    # An execution nobody here waits for is not read back either.
    assert await weaver.writer.run(_ends(tenant, other.id)) is True
    assert len(finals) == 0
    assert await weaver.writer.run(_ends(tenant, row.id, exit_code=3)) is True
    got = await waiter
    assert got.state == "failure" and got.exit_code == 3
    assert reads == []


def test_a_kept_row_is_only_its_tenants_and_only_while_someone_waits() -> None:
    class Row:
        id, tenant_id, state = "ex_1", "tn_a", "success"

    finals = Finals()
    finals.keep([Row()])
    assert finals.take("ex_1", "tn_a") is None  # nobody waited: not kept
    finals.watch("ex_1")
    finals.watch("ex_1")
    finals.keep([Row()])
    assert finals.take("ex_1", "tn_b") is None
    assert finals.take("ex_1", "tn_a") is not None
    finals.unwatch("ex_1")
    assert finals.take("ex_1", "tn_a") is not None  # the other waiter still waits
    finals.unwatch("ex_1")
    assert finals.take("ex_1", "tn_a") is None and len(finals) == 0
