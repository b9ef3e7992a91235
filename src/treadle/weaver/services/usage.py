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
import re
import time
from typing import Any

from sqlalchemy import Integer, bindparam, case, func, select, update
from sqlalchemy import cast as sa_cast

from treadle.domain import pricing
from treadle.domain.resources import Resources
from treadle.protocol import UsageAck, UsageKey, UsageRecord, UsageReport, WeaverMessage
from treadle.weaver.metrics import WeaverMetrics
from treadle.weaver.services.nodes import NodeSession
from treadle.weaver.store import tables
from treadle.weaver.store.database import Database, direct
from treadle.weaver.store.writer import Tx

__all__ = ["CLOCK_SKEW_S", "UsageService"]

log = logging.getLogger(__name__)

# How far a node's clock may be from Weaver's before its times are not believed.
CLOCK_SKEW_S = 300.0
_E, _S, _U = tables.executions, tables.sandboxes, tables.usage_records
# Whose a record is, read for every record stored: built once.
_EXECUTION_OWNER = direct(
    select(
        _E.c.tenant_id, _E.c.function, _E.c.resources, _E.c.attempt, _E.c.node_id, _E.c.created_at
    ).where(_E.c.id == bindparam("_id"))
)
_SANDBOX_OWNER = direct(
    select(
        _S.c.tenant_id,
        _S.c.id.label("function"),
        _S.c.spec,
        _S.c.incarnation.label("attempt"),
        _S.c.node_id,
        _S.c.created_at,
    ).where(_S.c.id == bindparam("_id"))
)

_ADD_COST = (
    update(_E)
    .where(_E.c.id == bindparam("_id"))
    .values(cost=func.coalesce(_E.c.cost, 0.0) + bindparam("_cost"))
)
# The same, only while the execution's attempt is on that node (the fence of a record stored
# without reading the row); with nothing to add, the fence alone.
_ON_NODE = (_E.c.attempt == bindparam("_attempt"), _E.c.node_id == bindparam("_node"))
_ADD_COST_ON_NODE = _ADD_COST.where(*_ON_NODE)
_HELD_ON_NODE = update(_E).where(_E.c.id == bindparam("_id"), *_ON_NODE).values(cost=_E.c.cost)


# What `summary` totals, and what it may group by.
MEASURES = (
    "wall_s",
    "paused_s",
    "cpu_s",
    "memory_gib_s",
    "disk_read_bytes",
    "disk_write_bytes",
    "net_in_bytes",
    "net_out_bytes",
    "gpu_s",
    "cost",
)
GROUPS = ("tenant", "kind", "function", "sandbox", "node", "hour", "day")
# A group of its own per value of a sandbox's metadata key: `label:KEY`.
LABEL_GROUP = "label:"
# The metadata keys usage can be filtered and grouped by (quoted into a JSON path in SQL).
LABEL_KEY = re.compile(r"[A-Za-z0-9_.:/-]{1,64}")
_BUCKETS = {"hour": 3600, "day": 86400}


class UsageService:
    def __init__(self, db: Database, metrics: WeaverMetrics | None = None) -> None:
        self._db = db
        self._metrics = metrics

    async def summary(
        self,
        *,
        tenant_id: str | None,
        start: float,
        end: float,
        group_by: list[str],
        kind: str | None = None,
        function: str | None = None,
        sandbox: str | None = None,
        node: str | None = None,
        labels: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        """The ledger's records that ended in [start, end), of a tenant (None: all), summed
        per group: `{"groups": [{"key": {...}, "records", measures...}], "totals": {...}}`.
        A record counts wholly in the group of the time it ended in."""
        columns: list[Any] = []
        for name in group_by:
            if name in _BUCKETS:
                columns.append(self._bucket(_BUCKETS[name]).label(name))
            elif name.startswith(LABEL_GROUP):
                columns.append(_label(name.removeprefix(LABEL_GROUP)).label(name))
            else:
                columns.append(_GROUP_COLUMNS[name].label(name))
        sums = [func.coalesce(func.sum(_U.c[m]), 0).label(m) for m in MEASURES]
        query = select(*columns, func.count().label("records"), *sums).where(
            _U.c.end >= start, _U.c.end < end
        )
        if tenant_id is not None:
            query = query.where(_U.c.tenant_id == tenant_id)
        if kind is not None:
            query = query.where(_U.c.kind == kind)
        if function is not None:
            query = query.where(_U.c.kind == "execution", _U.c.subject == function)
        if sandbox is not None:
            query = query.where(_U.c.kind == "sandbox", _U.c.workload_id == sandbox)
        if node is not None:
            query = query.where(_U.c.node_id == node)
        for key, value in (labels or {}).items():
            query = query.where(_U.c.kind == "sandbox", _label(key) == value)
        if columns:
            query = query.group_by(*columns).order_by(*columns)
        async with self._db.read() as conn:
            rows = (await conn.execute(query)).all()
        groups: list[dict[str, Any]] = []
        for row in rows:
            values = row._mapping
            groups.append(
                {
                    "key": {name: _key_value(name, values[name]) for name in group_by},
                    "records": int(values["records"]),
                    **{m: _number(m, values[m]) for m in MEASURES},
                }
            )
        totals = {m: _number(m, sum(g[m] for g in groups)) for m in MEASURES}
        totals["records"] = sum(int(g["records"]) for g in groups)
        return {"groups": groups if group_by else [], "totals": totals}

    async def records(
        self, tenant_id: str, kind: str, workload_id: str, start: float, end: float, limit: int
    ) -> list[Any]:
        """A workload's ledger rows that ended in [start, end), oldest first, the last
        `limit` of them."""
        query = (
            select(_U)
            .where(
                _U.c.tenant_id == tenant_id,
                _U.c.kind == kind,
                _U.c.workload_id == workload_id,
                _U.c.end >= start,
                _U.c.end < end,
            )
            .order_by(_U.c.end.desc())
            .limit(limit)
        )
        async with self._db.read() as conn:
            rows = (await conn.execute(query)).all()
        return list(reversed(rows))

    def _bucket(self, seconds: int) -> Any:
        """The start of the hour or day (UTC) a record ended in, in SQL of either store."""
        if self._db.dialect == "postgresql":
            return func.floor(_U.c.end / seconds) * seconds
        return sa_cast(_U.c.end / seconds, Integer) * seconds  # SQLite truncates

    async def report(self, tx: Tx, session: NodeSession, msg: UsageReport) -> list[WeaverMessage]:
        now = time.time()
        for record in msg.records:
            if await self._store_new(tx, session, record, now):
                continue
            owner = await self._owner(tx, session, record, now)
            if owner is None:
                continue
            tenant_id, subject, reserved = owner
            values, cost = self._priced(session, record, tenant_id, subject, reserved, now)
            statement = self._db.insert_ignoring_conflicts(_U, returning=_U.c.seq)
            if (await tx.conn.execute(statement, values)).first() is None:
                continue  # stored before: counted once
            self._stored(record, now)
            if record.kind == "execution" and cost:
                # Once per record: the insert just made is what says it is new.
                await tx.swap(record.id, _ADD_COST, {"_id": record.id, "_cost": cost})
        keys = [
            UsageKey(kind=r.kind, id=r.id, generation=r.generation, seq=r.seq) for r in msg.records
        ]
        return [UsageAck(keys=keys)]

    async def _store_new(
        self, tx: Tx, session: NodeSession, record: UsageRecord, now: float
    ) -> bool:
        """The usual case, decided without reading the row: a record of a fresh attempt this
        session placed (every record of it came over this link), with a seq it has not
        stored. Fenced in the store on (execution, attempt, node) as the read would have
        been, and stored with the batch's other writes. False: the store must tell."""
        if record.kind != "execution":
            return False
        placed = session.attempts.get((record.id, record.generation))
        if placed is None or placed.settled or placed.output is None or placed.kind is None:
            return False
        seen: set[int] = tx.scratch.setdefault(("usage", record.id, record.generation), set())
        if record.seq in placed.metered or record.seq in seen:
            return False  # sent again: the store tells it stored once
        # No use of it starts before this session placed it.
        if record.start < placed.since - CLOCK_SKEW_S or record.end > now + CLOCK_SKEW_S:
            self._refuse(session, record, "outside the workload's life")
            return True
        values, cost = self._priced(
            session, record, placed.tenant_id, placed.kind[1], placed.resources, now
        )
        fence = {"_id": record.id, "_attempt": record.generation, "_node": session.node_id}
        if cost:
            held = await tx.swap(record.id, _ADD_COST_ON_NODE, {**fence, "_cost": cost})
        else:
            held = await tx.swap(record.id, _HELD_ON_NODE, fence)
        if not held:
            return False  # the attempt moved: the slow way refuses it
        seen.add(record.seq)
        await tx.insert_later(self._db.insert_ignoring_conflicts(_U), values)
        tx.after_commit.append(lambda: placed.metered.add(record.seq))
        self._stored(record, now)
        return True

    async def _owner(
        self, tx: Tx, session: NodeSession, record: UsageRecord, now: float
    ) -> tuple[str, str, Resources] | None:
        """Whose record this is (tenant, what of, what it reserved), if the node may bill it."""
        if record.kind == "execution":
            row = (await tx.conn.execute(_EXECUTION_OWNER, {"_id": record.id})).first()
        else:
            row = (await tx.conn.execute(_SANDBOX_OWNER, {"_id": record.id})).first()
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

    def _stored(self, record: UsageRecord, now: float) -> None:
        if self._metrics is not None:
            self._metrics.ledger_delay.observe(max(0.0, now - record.end))

    @staticmethod
    def _priced(
        session: NodeSession,
        record: UsageRecord,
        tenant_id: str,
        subject: str,
        reserved: Resources,
        now: float,
    ) -> tuple[dict[str, Any], float]:
        """The ledger row of `record`, priced at its node's price, and its cost."""
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
        return values, cost


_GROUP_COLUMNS = {
    "tenant": _U.c.tenant_id,
    "kind": _U.c.kind,
    # a sandbox is of no function, and an execution is no sandbox
    "function": case((_U.c.kind == "execution", _U.c.subject), else_=None),
    "sandbox": case((_U.c.kind == "sandbox", _U.c.workload_id), else_=None),
    "node": _U.c.node_id,
}
_INTEGERS = {"disk_read_bytes", "disk_write_bytes", "net_in_bytes", "net_out_bytes"}


def _number(measure: str, value: Any) -> float | int:
    return int(value or 0) if measure in _INTEGERS else float(value or 0.0)


def _label(key: str) -> Any:
    """The value of a sandbox's metadata `key` for a record (NULL for executions, which
    carry no metadata, and for sandboxes without the key)."""
    if not LABEL_KEY.fullmatch(key):
        raise ValueError(f"not a label key: {key!r}")
    return (
        select(_S.c.metadata[key].as_string())
        .where(_S.c.id == _U.c.workload_id, _U.c.kind == "sandbox")
        .scalar_subquery()
    )


def _key_value(name: str, value: Any) -> Any:
    if name in _BUCKETS:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(float(value)))
    return value
