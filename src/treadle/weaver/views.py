"""Rows as the API shows them. Times become ISO 8601 UTC strings."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from treadle.domain.execution import ExecutionState, is_terminal

__all__ = ["RESULT_COLUMNS", "execution_view", "iso", "result_view"]


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def execution_view(row: Any) -> dict[str, Any]:
    state = ExecutionState(row.state)
    timestamps: dict[str, str | None] = {"open": iso(row.created_at)}
    if row.running_at is not None:
        timestamps["running"] = iso(row.running_at)
    if is_terminal(state):
        timestamps[state.value] = iso(row.ended_at)
    return {
        "id": row.id,
        "tenant_id": row.tenant_id,
        "function": row.function,
        "version": row.version,
        "state": state.value,
        "attempt": row.attempt,
        "max_attempts": row.max_attempts,
        "node_id": row.node_id,
        "exit_code": row.exit_code,
        "result": row.result,
        "error": row.error,
        "pending_reason": row.pending_reason,
        "args": row.args,
        "idempotency_key": row.idempotency_key,
        "cancel_requested": bool(row.cancel_requested),
        "output_truncated": bool(row.output_truncated),
        "isolation": row.isolation,
        "resources": row.resources,
        "placement": row.placement,
        "timestamps": timestamps,
        "created_at": iso(row.created_at),
        "duration_ms": row.duration_ms,
        "cost": row.cost,
    }


# What a batch's item shows of its execution (`result_view`): how it ended, not what it was
# asked (its args the caller sent; the rest is one GET of the execution away).
RESULT_COLUMNS = (
    "id",
    "state",
    "attempt",
    "node_id",
    "exit_code",
    "result",
    "error",
    "output_truncated",
    "duration_ms",
    "cost",
    "batch_id",
    "batch_index",
    "ended_at",
)


def result_view(row: Any) -> dict[str, Any]:
    return {
        "id": row.id,
        "state": row.state,
        "attempt": row.attempt,
        "node_id": row.node_id,
        "exit_code": row.exit_code,
        "result": row.result,
        "error": row.error,
        "output_truncated": bool(row.output_truncated),
        "duration_ms": row.duration_ms,
        "cost": row.cost,
    }
