"""The one place that changes an execution's state: applies the domain transition table,
writes with compare-and-swap on (state, attempt), and records the event in the same
transaction."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from treadle.domain.errors import NotFound
from treadle.domain.execution import Event, ExecutionState, apply, is_terminal
from treadle.weaver.store import tables
from treadle.weaver.store.statements import (
    EXECUTION_BY_ID,
    EXECUTION_CAS,
    EXECUTION_CAS_ON_NODE,
)
from treadle.weaver.store.writer import Tx

__all__ = ["Expected", "load_execution", "transition"]

_E = tables.executions


async def load_execution(tx: Tx, execution_id: str, tenant_id: str | None = None) -> Any:
    row = (await tx.conn.execute(EXECUTION_BY_ID, {"_id": execution_id})).first()
    if row is None or (tenant_id is not None and row.tenant_id != tenant_id):
        raise NotFound(f"execution {execution_id!r} not found", details={"id": execution_id})
    return row


@dataclass(frozen=True, slots=True)
class Expected:
    """What a caller knows an execution to be without reading it: enough to attempt a
    transition. If the execution is not like that any more, `transition` returns False."""

    id: str
    tenant_id: str
    state: str
    attempt: int
    node_id: str
    batch_id: str | None = None


async def transition(tx: Tx, row: Any, event: Event, **values: Any) -> bool:
    """Move `row` (a stored row, or an `Expected`) by `event`; False when it is not in that
    state and attempt (and, for an `Expected`, on that node) any more: the caller re-reads.

    Raises InvalidTransition when `event` is not valid in the row's state.
    """
    state = apply(ExecutionState(row.state), event)
    values["state"] = state.value
    if state is ExecutionState.RUNNING:
        values.setdefault("running_at", tx.now)
    if is_terminal(state):
        values.setdefault("ended_at", tx.now)
    params = {"_id": row.id, "_state": row.state, "_attempt": row.attempt, **values}
    if isinstance(row, Expected):
        # A node's report on an attempt it holds: it nearly always applies, so it may be
        # deferred and sent with others like it (the writer's `swap`).
        swapped = await tx.swap(row.id, EXECUTION_CAS_ON_NODE, {"_node": row.node_id, **params})
    else:
        swapped = (await tx.conn.execute(EXECUTION_CAS, params)).rowcount == 1
    if not swapped:
        return False
    tx.emit(
        f"execution.{state.value}",
        row.id,
        row.tenant_id,
        {
            "state": state.value,
            "previous": row.state,
            "attempt": values.get("attempt", row.attempt),
            "node_id": values.get("node_id", row.node_id),
            "exit_code": values.get("exit_code"),
            "error": values.get("error"),
        },
    )
    if is_terminal(state):
        tx.ended(row.id)
    batch_id = getattr(row, "batch_id", None)
    if batch_id is not None and is_terminal(state):
        # Whoever gathers the batch's results reads this one now (`batches`).
        tx.notify(f"batch.{batch_id}", batch_id, {"id": row.id})
    return True
