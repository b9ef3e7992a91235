"""Statements on the hot path, built once: SQLAlchemy then reuses their compiled form and
cache key instead of rebuilding both on every call, and on PostgreSQL they go through psycopg
itself (`direct`)."""

from __future__ import annotations

from sqlalchemy import bindparam, func, select, update

from treadle.weaver.store import tables
from treadle.weaver.store.database import direct

__all__ = [
    "ACTIVE_STATE_VALUES",
    "EXECUTION_ASSIGN",
    "EXECUTION_BY_ID",
    "EXECUTION_BY_IDEMPOTENCY_KEY",
    "EXECUTION_BY_TENANT_AND_ID",
    "EXECUTION_CAS",
    "EXECUTION_CAS_ON_NODE",
    "EXECUTION_FENCE",
    "EXECUTION_UPDATE_ATTEMPT",
    "OUTPUT_COUNT_ON_NODE",
    "OUTPUT_STATE",
]

_E = tables.executions
_O = tables.output_chunks

ACTIVE_STATE_VALUES = tables.ACTIVE_STATE_VALUES

EXECUTION_BY_ID = direct(select(_E).where(_E.c.id == bindparam("_id")))
EXECUTION_BY_TENANT_AND_ID = EXECUTION_BY_ID.where(_E.c.tenant_id == bindparam("_tenant"))
EXECUTION_BY_IDEMPOTENCY_KEY = direct(
    select(_E).where(
        _E.c.tenant_id == bindparam("_tenant"), _E.c.idempotency_key == bindparam("_key")
    )
)

# The attempt and node an execution is on: enough to fence a report without the whole row.
EXECUTION_FENCE = direct(select(_E.c.attempt, _E.c.node_id).where(_E.c.id == bindparam("_id")))

# What storing an output frame needs to know, in one round trip: the fence, how much output
# the attempt has stored, and its last stored chunk (`top`, None before the first).
OUTPUT_STATE = direct(
    select(
        _E.c.attempt,
        _E.c.node_id,
        _E.c.output_bytes,
        _E.c.output_truncated,
        select(func.max(_O.c.seq))
        .where(_O.c.execution_id == _E.c.id, _O.c.attempt == bindparam("_attempt"))
        .scalar_subquery()
        .label("top"),
    ).where(_E.c.id == bindparam("_id"))
)

# Compare-and-swap: the SET columns come from the parameters' other keys.
EXECUTION_CAS = direct(
    update(_E).where(
        _E.c.id == bindparam("_id"),
        _E.c.state == bindparam("_state"),
        _E.c.attempt == bindparam("_attempt"),
    )
)

# Assign an open, unassigned execution to a node (SET columns from the parameters).
EXECUTION_ASSIGN = direct(
    update(_E).where(
        _E.c.id == bindparam("_id"),
        _E.c.attempt == bindparam("_attempt"),
        _E.c.state == "open",
        _E.c.node_id.is_(None),
    )
)

# The same, for an attempt known to be on one node (fencing without reading the row first).
EXECUTION_CAS_ON_NODE = EXECUTION_CAS.where(_E.c.node_id == bindparam("_node"))

EXECUTION_UPDATE_ATTEMPT = direct(
    update(_E).where(_E.c.id == bindparam("_id"), _E.c.attempt == bindparam("_attempt"))
)

# An attempt's output count, fenced as a report on an attempt its node holds.
OUTPUT_COUNT_ON_NODE = EXECUTION_UPDATE_ATTEMPT.where(_E.c.node_id == bindparam("_node"))
