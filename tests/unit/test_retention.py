"""What has ended is removed once the retention period has passed since it ended, and nothing
else: not what still runs, not what ended recently, not the usage ledger."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from support.rows import execution_rows
from support.weaver import running_weaver
from treadle.domain.errors import NotFound
from treadle.weaver.core import Weaver
from treadle.weaver.ids import BATCH, EVENT, EXECUTION, SANDBOX, new_id
from treadle.weaver.services.retention import Retention
from treadle.weaver.settings import WeaverSettings
from treadle.weaver.store import tables

DAY = 86400.0
NOW = time.time()
OLD, RECENT = NOW - 3 * DAY, NOW - 3600.0


@pytest.fixture
async def weaver(
    request: pytest.FixtureRequest, database_url: Callable[..., str], tmp_path: Path
) -> Any:
    store, keep_s = request.param
    url = database_url(store)
    async with running_weaver(tmp_path / "weaver", url, history_retention_s=keep_s) as started:
        yield started


def _execution(tenant: str, made: float, state: str, ended: float | None, **more: Any) -> Any:
    row = execution_rows(1)[0] | {"tenant_id": tenant, "batch_id": None, "batch_index": None}
    return row | {
        "id": new_id(EXECUTION, at=made),
        "state": state,
        "created_at": made,
        "ended_at": ended,
        **more,
    }


def _sandbox(tenant: str, made: float, status: str, ended: float | None) -> dict[str, Any]:
    return {
        "id": new_id(SANDBOX, at=made),
        "tenant_id": tenant,
        "status": status,
        "desired": "stopped" if ended else "running",
        "incarnation": 1,
        "spec": {},
        "metadata": {},
        "created_at": made,
        "ended_at": ended,
        "updated_at": ended or made,
    }


def _batch(tenant: str, made: float) -> dict[str, Any]:
    return {
        "id": new_id(BATCH, at=made),
        "tenant_id": tenant,
        "function": "f",
        "version": 1,
        "size": 1,
        "refused": {},
        "reused": {},
        "created_at": made,
    }


def _event(made: float) -> dict[str, Any]:
    return {
        "id": new_id(EVENT, at=made),
        "type": "x.y",
        "subject_id": "s",
        "data": {},
        "created_at": made,
    }


def _usage(tenant: str, made: float) -> dict[str, Any]:
    zero = dict.fromkeys(
        ["wall_s", "paused_s", "cpu_s", "memory_peak_mib", "memory_gib_s", "gpu_s"], 0.0
    )
    counts = dict.fromkeys(
        ["disk_read_bytes", "disk_write_bytes", "net_in_bytes", "net_out_bytes"], 0
    )
    return {
        "kind": "execution",
        "workload_id": new_id(EXECUTION, at=made),
        "generation": 1,
        "seq": 1,
        "tenant_id": tenant,
        "node_id": "n",
        "subject": "f",
        "start": made,
        "end": made + 1,
        "final": True,
        "gpu_memory_peak_mib": 0.0,
        "price_per_hour": 0.0,
        "share": 0.0,
        "cost": 0.0,
        "recorded_at": made + 1,
        **zero,
        **counts,
    }


async def _ids(weaver: Weaver, table: Any) -> set[str]:
    column = table.c.id if table is not tables.usage_records else table.c.workload_id
    async with weaver.db.read() as conn:
        return set((await conn.execute(select(column))).scalars())


@pytest.mark.parametrize(
    "weaver", [("sqlite", DAY), ("postgresql", DAY)], indirect=True, ids=["sqlite", "pg"]
)
async def test_what_ended_before_the_retention_period_is_removed_and_nothing_else(
    weaver: Weaver,
) -> None:
    tenant = (await weaver.auth.create_tenant("t"))[0]["id"]
    done_batch, kept_batch, new_batch = (
        _batch(tenant, OLD),
        _batch(tenant, OLD),
        _batch(tenant, RECENT),
    )
    gone = {
        "done": _execution(tenant, OLD, "success", OLD + 5, batch_id=done_batch["id"]),
        # Cancelled while open: it never ran, so its age is its creation's.
        "cancelled": _execution(tenant, OLD, "cancelled", None),
    }
    kept = {
        "running": _execution(tenant, OLD, "running", None),
        "open": _execution(tenant, OLD, "open", None),
        "ended lately": _execution(tenant, OLD, "failure", RECENT, batch_id=kept_batch["id"]),
        "new": _execution(tenant, RECENT, "success", RECENT + 1),
    }
    sandboxes = {
        "stopped": _sandbox(tenant, OLD, "stopped", OLD + 5),
        "failed": _sandbox(tenant, OLD, "failed", OLD + 5),
        "running": _sandbox(tenant, OLD, "running", None),
        "stopped lately": _sandbox(tenant, OLD, "stopped", RECENT),
    }
    events = {"old": _event(OLD), "new": _event(RECENT)}
    done = gone["done"]["id"]
    chunks = [
        {"execution_id": execution["id"], "attempt": 1, "seq": seq, "stream": "stdout", "data": "x"}
        for execution in (gone["done"], kept["ended lately"])
        for seq in (0, 1)
    ]
    async with weaver.db.transaction() as conn:
        await conn.execute(tables.batches.insert(), [done_batch, kept_batch, new_batch])
        await conn.execute(tables.executions.insert(), [*gone.values(), *kept.values()])
        await conn.execute(tables.output_chunks.insert(), chunks)
        await conn.execute(tables.sandboxes.insert(), list(sandboxes.values()))
        await conn.execute(tables.events.insert(), list(events.values()))
        await conn.execute(tables.usage_records.insert(), [_usage(tenant, OLD)])
    events_before = await _ids(weaver, tables.events)

    await weaver.reconciler.tick()  # the one replica leads, and sweeps

    assert await _ids(weaver, tables.executions) == {row["id"] for row in kept.values()}
    async with weaver.db.read() as conn:
        left = await conn.execute(select(tables.output_chunks.c.execution_id).distinct())
        assert set(left.scalars()) == {kept["ended lately"]["id"]}
    assert await _ids(weaver, tables.batches) == {kept_batch["id"], new_batch["id"]}
    assert await _ids(weaver, tables.sandboxes) == {
        sandboxes["running"]["id"],
        sandboxes["stopped lately"]["id"],
    }
    events_after = await _ids(weaver, tables.events)  # with any the pass itself emitted
    assert events["old"]["id"] not in events_after
    assert events_before - {events["old"]["id"]} <= events_after
    assert len(await _ids(weaver, tables.usage_records)) == 1
    with pytest.raises(NotFound):
        await weaver.executions.get(tenant, done)
    with pytest.raises(NotFound):
        await weaver.batches.get(tenant, done_batch["id"])


@pytest.mark.parametrize("weaver", [("sqlite", DAY)], indirect=True, ids=["sqlite"])
async def test_a_backlog_goes_a_chunk_a_pass_oldest_first(weaver: Weaver) -> None:
    tenant = (await weaver.auth.create_tenant("t"))[0]["id"]
    rows = [_execution(tenant, OLD + i, "success", OLD + i + 1) for i in range(5)]
    async with weaver.db.transaction() as conn:
        await conn.execute(tables.executions.insert(), rows)
    retention = Retention(weaver.writer, keep_s=DAY, chunk=2)
    removed = []
    for _ in range(3):
        removed.append((await retention.sweep(NOW - DAY))["executions"])
        left = await _ids(weaver, tables.executions)
        # The oldest go first: what is left is always the newest.
        assert left == {row["id"] for row in rows[len(rows) - len(left) :]}
    assert removed == [2, 2, 1]
    assert (await retention.sweep(NOW - DAY))["executions"] == 0


@pytest.mark.parametrize("weaver", [("sqlite", 0.0)], indirect=True, ids=["sqlite"])
async def test_a_retention_of_zero_keeps_everything(weaver: Weaver) -> None:
    tenant = (await weaver.auth.create_tenant("t"))[0]["id"]
    old = _execution(tenant, NOW - 3650 * DAY, "success", NOW - 3650 * DAY)
    async with weaver.db.transaction() as conn:
        await conn.execute(tables.executions.insert(), [old])
    await weaver.reconciler.tick()
    async with weaver.db.read() as conn:
        count = select(func.count()).select_from(tables.executions)
        assert (await conn.execute(count)).scalar_one() == 1


@pytest.mark.parametrize("value", ["-1", "inf", "nan", "1e300"])
def test_a_retention_that_is_no_duration_is_refused(value: str) -> None:
    with pytest.raises(ValueError, match="history_retention_s"):
        WeaverSettings(history_retention_s=value)  # type: ignore[arg-type]
