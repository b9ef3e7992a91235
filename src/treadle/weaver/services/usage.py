"""The usage ledger (DESIGN §13): what nodes measured of each workload, stored once per
record and priced by Weaver.

A node sends usage records (`UsageReport`) and keeps each until Weaver acknowledges it
(`UsageAck`), sending them again after a reconnect; a record is stored under its key (kind,
workload, generation, seq), so one sent twice is stored once, and the workload's use is the
sum of its records. Weaver prices each record as it stores it (`treadle.domain.pricing`: the
node's price as billed, the share the workload reserved, the time), never taking a cost from
the node. An execution's `cost` is the sum of its records' (added once, when a record is
first stored).

A node may lie. A record counts only for a workload that node holds in that generation (an
execution's current attempt on that node, a sandbox's current incarnation there); its times
must lie within what Weaver saw of the workload (not before it was created, not after now);
anything else is acknowledged (so the node stops sending it) and dropped, with a warning.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from sqlalchemy import func, select, update

from treadle.domain import pricing
from treadle.domain.resources import Resources
from treadle.protocol import UsageAck, UsageKey, UsageRecord, UsageReport, WeaverMessage
from treadle.weaver.services.nodes import NodeSession
from treadle.weaver.store import tables
from treadle.weaver.store.database import Database
from treadle.weaver.store.writer import Tx

__all__ = ["CLOCK_SKEW_S", "UsageService"]

log = logging.getLogger(__name__)

# How far a node's clock may be from Weaver's before its times are not believed.
CLOCK_SKEW_S = 300.0
_E, _S, _U = tables.executions, tables.sandboxes, tables.usage_records


class UsageService:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def report(self, tx: Tx, session: NodeSession, msg: UsageReport) -> list[WeaverMessage]:
        now = time.time()
        for record in msg.records:
            owner = await self._owner(tx, session, record, now)
            if owner is None:
                continue
            tenant_id, subject, reserved = owner
            await self._store(tx, session, record, tenant_id, subject, reserved, now)
        keys = [
            UsageKey(kind=r.kind, id=r.id, generation=r.generation, seq=r.seq) for r in msg.records
        ]
        return [UsageAck(keys=keys)]

    async def _owner(
        self, tx: Tx, session: NodeSession, record: UsageRecord, now: float
    ) -> tuple[str, str, Resources] | None:
        """Whose record this is (tenant, what of, what it reserved), if the node may bill it."""
        if record.kind == "execution":
            row = (
                await tx.conn.execute(
                    select(
                        _E.c.tenant_id,
                        _E.c.function,
                        _E.c.resources,
                        _E.c.attempt,
                        _E.c.node_id,
                        _E.c.created_at,
                    ).where(_E.c.id == record.id)
                )
            ).first()
            held = row is not None and row.attempt == record.generation
        else:
            row = (
                await tx.conn.execute(
                    select(
                        _S.c.tenant_id,
                        _S.c.id.label("function"),
                        _S.c.spec,
                        _S.c.incarnation.label("attempt"),
                        _S.c.node_id,
                        _S.c.created_at,
                    ).where(_S.c.id == record.id)
                )
            ).first()
            held = row is not None and row.attempt == record.generation
        if row is None or not held or row.node_id != session.node_id:
            return self._refuse(session, record, "not a workload this node holds")
        if record.start < row.created_at - CLOCK_SKEW_S or record.end > now + CLOCK_SKEW_S:
            return self._refuse(session, record, "outside the workload's life")
        raw = row.resources if record.kind == "execution" else (row.spec or {}).get("resources")
        try:
            reserved = Resources.model_validate(raw or {})
        except ValueError:
            return self._refuse(session, record, "its workload's resources are unreadable")
        return row.tenant_id, str(row.function), reserved

    @staticmethod
    def _refuse(session: NodeSession, record: UsageRecord, why: str) -> None:
        log.warning(
            "node %s: usage record %s refused: %s",
            session.node_id,
            "/".join(map(str, record.key)),
            why,
        )
        return None

    async def _store(
        self,
        tx: Tx,
        session: NodeSession,
        record: UsageRecord,
        tenant_id: str,
        subject: str,
        reserved: Resources,
        now: float,
    ) -> None:
        hello = session.hello
        price = pricing.node_price(hello.price_per_hour, hello.spot, hello.spot_price_per_hour)
        share = pricing.share(reserved, session.capacity)
        paused_share = pricing.share(reserved, session.capacity, paused=True)
        running_s = record.wall_s - record.paused_s
        cost = pricing.cost(price, share, running_s) + pricing.cost(
            price, paused_share, record.paused_s
        )
        values: dict[str, Any] = {
            **record.model_dump(exclude={"kind", "id", "generation", "seq"}),
            "kind": record.kind,
            "workload_id": record.id,
            "generation": record.generation,
            "seq": record.seq,
            "tenant_id": tenant_id,
            "node_id": session.node_id,
            "subject": subject[:64],
            "price_per_hour": price,
            "share": share,
            "cost": cost,
            "recorded_at": now,
        }
        inserted = await tx.conn.execute(self._db.insert_ignoring_conflicts(_U), values)
        if inserted.rowcount == 1 and record.kind == "execution" and cost:
            # Once per record: the insert just made is what says it is new.
            await tx.conn.execute(
                update(_E)
                .where(_E.c.id == record.id)
                .values(cost=func.coalesce(_E.c.cost, 0.0) + cost)
            )
