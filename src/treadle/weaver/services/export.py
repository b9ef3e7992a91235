"""The usage ledger, exported as CloudEvents to an OpenMeter-compatible ingest endpoint
(`TREADLE_OPENMETER_URL`, with `TREADLE_OPENMETER_TOKEN` as a bearer token).

Records go in the ledger's export order (when they were stored, then their key), in batches
(`application/cloudevents-batch+json`), by the replica that leads (one exporter for the
fleet). After each batch the endpoint accepted, a cursor in the store moves past it, so a
restarted Weaver (or another replica taking the lead) goes on from there: nothing is lost. An
event's `id` is its record's key, the same each time it is sent, so an endpoint that sees a
batch again (the cursor had not moved when Weaver died) keeps one of each: nothing is counted
twice. While the endpoint fails, the batch is sent again after a pause that doubles up to a
minute; the export's lag shows in the metrics.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

import httpx
from sqlalchemy import select, tuple_, update

from treadle.weaver.services.usage import MEASURES
from treadle.weaver.store import tables
from treadle.weaver.views import iso

if TYPE_CHECKING:
    from treadle.weaver.core import Weaver

__all__ = ["UsageExporter", "cloud_event"]

log = logging.getLogger(__name__)

_U, _C = tables.usage_records, tables.export_cursors
CURSOR = "openmeter"
EVENT_TYPE = "treadle.usage"
# What each event carries of its record: what is summed, and the peaks.
_MEASURES = (*MEASURES, "memory_peak_mib", "gpu_memory_peak_mib")
_ORDER = (_U.c.recorded_at, _U.c.kind, _U.c.workload_id, _U.c.generation, _U.c.seq)
_IDLE_S = 2.0
_MAX_PAUSE_S = 60.0


def cloud_event(row: Any, source: str) -> dict[str, Any]:
    """One ledger record as a CloudEvent (specversion 1.0); `subject` is its tenant."""
    data: dict[str, Any] = {
        "kind": row.kind,
        "workload": row.workload_id,
        "generation": row.generation,
        "seq": row.seq,
        "node": row.node_id,
        "start": iso(row.start),
        "end": iso(row.end),
        "final": bool(row.final),
        "price_per_hour": row.price_per_hour,
        "share": row.share,
        **{m: getattr(row, m) for m in _MEASURES},
    }
    data["function" if row.kind == "execution" else "sandbox"] = row.subject
    return {
        "specversion": "1.0",
        "id": f"{row.kind}/{row.workload_id}/{row.generation}/{row.seq}",
        "source": source,
        "type": EVENT_TYPE,
        "subject": row.tenant_id,
        "time": iso(row.end),
        "datacontenttype": "application/json",
        "data": data,
    }


class UsageExporter:
    def __init__(self, weaver: Weaver, url: str, token: str | None, batch: int) -> None:
        self._weaver = weaver
        self._url = url
        self._token = token
        self._batch = batch
        self._source = f"treadle/{weaver.settings.export_source}"
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="treadle-usage-export")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        pause = 1.0
        headers = {"Content-Type": "application/cloudevents-batch+json"}
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        async with httpx.AsyncClient(timeout=30, headers=headers) as http:
            while True:
                if not self._weaver.leads:
                    await asyncio.sleep(_IDLE_S)
                    continue
                try:
                    sent = await self._once(http)
                except Exception as exc:
                    log.warning(
                        "usage export to %s failed (again in %.0fs): %s", self._url, pause, exc
                    )
                    await asyncio.sleep(pause)
                    pause = min(pause * 2, _MAX_PAUSE_S)
                    continue
                pause = 1.0
                if sent < self._batch:
                    await asyncio.sleep(_IDLE_S)

    async def _once(self, http: httpx.AsyncClient) -> int:
        """Send the next batch; how many records it held."""
        weaver = self._weaver
        async with weaver.db.read() as conn:
            cursor = (await conn.execute(select(_C).where(_C.c.name == CURSOR))).first()
            query = select(_U).order_by(*_ORDER).limit(self._batch)
            if cursor is not None:
                after = (
                    cursor.recorded_at,
                    cursor.kind,
                    cursor.workload_id,
                    cursor.generation,
                    cursor.seq,
                )
                query = query.where(tuple_(*_ORDER) > tuple_(*after))
            rows = (await conn.execute(query)).all()
        metrics = weaver.metrics
        if not rows:
            metrics.export_lag.set(0)
            return 0
        metrics.export_lag.set(max(0.0, time.time() - rows[0].recorded_at))
        events = [cloud_event(row, self._source) for row in rows]
        answer = await http.post(self._url, json=events)
        if answer.status_code // 100 != 2:
            raise RuntimeError(f"HTTP {answer.status_code}: {answer.text[:200]}")
        last = rows[-1]
        values = {
            "recorded_at": last.recorded_at,
            "kind": last.kind,
            "workload_id": last.workload_id,
            "generation": last.generation,
            "seq": last.seq,
            "updated_at": time.time(),
        }

        async def move(tx: Any) -> None:
            await tx.conn.execute(
                weaver.db.insert_ignoring_conflicts(_C), {"name": CURSOR, **values}
            )
            await tx.conn.execute(update(_C).where(_C.c.name == CURSOR).values(**values))

        await weaver.writer.run(move)
        metrics.exported.inc(len(rows))
        return len(rows)
