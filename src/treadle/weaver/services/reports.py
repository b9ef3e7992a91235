"""What nodes report: hello (reconcile), started, output, exited.

Each handler runs inside a writer transaction and returns the frames to send back. Every
report is fenced: one about an attempt that is not the execution's current attempt on this
node is not applied, and the node is told to kill that attempt.

A node is not trusted with the limits it was given: output is stored only up to the
operator's cap (`OutputBudget`, as the node should have applied it), and a report outside the
protocol fails the execution it names (`refused`) rather than the node's link.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy import select, update

from treadle.domain.execution import (
    Event,
    ExecutionState,
    exit_outcome,
    is_terminal,
)
from treadle.domain.resources import Resources
from treadle.protocol import Ack, Cancel, Exited, Output, Started, WeaverMessage, WorkloadRef
from treadle.protocol.limits import INVALID_REPORT, OutputBudget
from treadle.weaver.services.fleet import announce_open
from treadle.weaver.services.nodes import RELIABILITY_ALPHA, NodeSession, OutputState
from treadle.weaver.services.speed import SpeedObserver
from treadle.weaver.services.transitions import Expected, transition
from treadle.weaver.store import tables
from treadle.weaver.store.statements import (
    ACTIVE_STATE_VALUES,
    EXECUTION_BY_ID,
    EXECUTION_CAS,
    EXECUTION_UPDATE_ATTEMPT,
    OUTPUT_COUNT_ON_NODE,
    OUTPUT_STATE,
)
from treadle.weaver.store.writer import Tx

__all__ = ["ReportService"]

_E = tables.executions
_O = tables.output_chunks
_REASON_MAX = 255  # the width of executions.error


async def _current(tx: Tx, execution_id: str) -> Any:
    return (await tx.conn.execute(EXECUTION_BY_ID, {"_id": execution_id})).first()


def _is_current(row: Any, session: NodeSession, attempt: int) -> bool:
    return row is not None and row.attempt == attempt and row.node_id == session.node_id


class ReportService:
    def __init__(self, on_capacity: Callable[[], None], on_requeue: Callable[[], None]) -> None:
        self._on_capacity = on_capacity
        self._on_requeue = on_requeue
        self._speeds = SpeedObserver()

    async def hello(
        self, tx: Tx, session: NodeSession, running: list[WorkloadRef]
    ) -> list[WeaverMessage]:
        """Reconcile the attempts the node runs with what Weaver expects of it (DESIGN §3)."""
        reported = {ref.key for ref in running}
        requeued = False
        for row in await self._active_on(tx, session.node_id):
            key = (row.id, row.attempt)
            if key in reported:
                session.reserve(
                    key,
                    Resources.model_validate(row.resources),
                    row.tenant_id,
                    batch=row.batch_id,
                )
                reported.discard(key)
                if row.state == ExecutionState.OPEN.value:
                    # It started: its `started` report was lost with the old link.
                    await transition(tx, row, Event.START)
            else:
                # The node never got it (an attempt a node started stays in its hello
                # until Weaver stored its exit), so the same attempt can be placed again.
                requeued |= await self.release_from(tx, row, may_have_started=False)
        # Still reported but not active here: it ended on Weaver's side (cancelled, perhaps
        # while the link was down, so the node never heard) or it is stale. Either way the
        # node must kill it; one that already exited just replays its exit report.
        cancels: list[WeaverMessage] = []
        for execution_id, attempt in reported:
            row = await _current(tx, execution_id)
            if _is_current(row, session, attempt):
                session.reserve(
                    (execution_id, attempt),
                    Resources.model_validate(row.resources),
                    row.tenant_id,
                    batch=row.batch_id,
                )
                cancels.append(
                    Cancel(id=execution_id, attempt=attempt, reason=row.error or "ended")
                )
            else:
                cancels.append(Cancel(id=execution_id, attempt=attempt, reason="stale"))
        if requeued:
            tx.after_commit.append(self._on_requeue)
        return cancels

    @staticmethod
    async def _active_on(tx: Tx, node_id: str) -> list[Any]:
        """The executions Weaver believes `node_id` holds."""
        query = select(_E).where(_E.c.node_id == node_id, _E.c.state.in_(ACTIVE_STATE_VALUES))
        return list(await tx.conn.execute(query))

    async def release_node(self, tx: Tx, node_id: str) -> None:
        """`node_id` holds nothing any more (it is down): its work runs again elsewhere."""
        requeued = False
        for row in await self._active_on(tx, node_id):
            requeued |= await self.release_from(tx, row, may_have_started=True)
        if requeued:
            tx.after_commit.append(self._on_requeue)

    async def release_from(self, tx: Tx, row: Any, *, may_have_started: bool) -> bool:
        """The node no longer holds `row`'s attempt. One that surely never started is placed
        again; one that started, or may have (its node is lost, and `started` reports can be
        lost with a link), runs again as a new attempt, or fails when attempts are spent.
        True when the execution is open again."""
        if row.state == ExecutionState.OPEN.value and not may_have_started:
            await tx.conn.execute(
                EXECUTION_CAS,
                {
                    "_id": row.id,
                    "_state": row.state,
                    "_attempt": row.attempt,
                    "node_id": None,
                    "placement": retry_placement(row.placement, None),
                },
            )
            announce_open(tx)
            return True
        return await self.lose(tx, row)

    async def lose(self, tx: Tx, row: Any) -> bool:
        """The attempt is gone with its node: run it again, or fail when attempts are spent."""
        if row.attempt < row.max_attempts:
            requeued = await transition(
                tx,
                row,
                Event.REQUEUE,
                queued_at=tx.now,
                attempt=row.attempt + 1,
                node_id=None,
                placement=retry_placement(row.placement, row.node_id),
                running_at=None,
                pending_reason=None,
                # The output columns count the current attempt's output.
                output_bytes=None,
                output_truncated=False,
            )
            if requeued:
                announce_open(tx)
            return requeued
        await transition(tx, row, Event.GIVE_UP, error="node_lost")
        return False

    async def started(self, tx: Tx, session: NodeSession, msg: Started) -> list[WeaverMessage]:
        held = session.attempts.get((msg.id, msg.attempt))
        if held is not None and not held.settled:
            # The usual case, decided without reading the row: open on this node, now running.
            expected = Expected(
                msg.id, held.tenant_id, "open", msg.attempt, session.node_id, held.batch
            )
            if await transition(tx, expected, Event.START):
                return []
        row = await _current(tx, msg.id)
        if not _is_current(row, session, msg.attempt):
            return [Cancel(id=msg.id, attempt=msg.attempt, reason="stale")]
        if row.state == ExecutionState.OPEN.value:
            await transition(tx, row, Event.START)
            return []
        if is_terminal(ExecutionState(row.state)):
            # Cancelled between assignment and start: make sure the process is killed.
            return [Cancel(id=msg.id, attempt=msg.attempt, reason=row.error or "cancelled")]
        return []

    async def output(
        self, tx: Tx, session: NodeSession, msg: Output, max_bytes: int | None = None
    ) -> list[WeaverMessage]:
        """Store the chunks of `msg` the attempt does not hold yet, up to `max_bytes` of
        output per attempt (None: no cap); past it the rest is dropped (and acknowledged, so
        the node drops it too)."""
        last = max(chunk.seq for chunk in msg.chunks)
        ack = Ack(id=msg.id, attempt=msg.attempt, seq=last)
        key = (msg.id, msg.attempt)
        held = session.attempts.get(key)
        if held is not None and not held.settled and held.output is not None:
            # The usual case, decided without reading the row: this session placed the
            # attempt and saw all its output so far. The count is fenced like a report.
            known = tx.scratch.get(("output", key), held.output)
            kept = self._kept(msg, known, max_bytes)
            if kept is None:
                return [ack]
            rows, stored = kept
            params = {"_node": session.node_id, **self._counted(msg, stored)}
            if await tx.swap(msg.id, OUTPUT_COUNT_ON_NODE, params):
                for row in rows:
                    await tx.insert_later(tx.db.insert_ignoring_conflicts(_O), row)
                tx.scratch[("output", key)] = stored
                tx.after_commit.append(lambda: setattr(held, "output", stored))
                tx.notify(f"output.{msg.id}", msg.id, {"attempt": msg.attempt, "seq": last})
                return [ack]
        state = (
            await tx.conn.execute(OUTPUT_STATE, {"_id": msg.id, "_attempt": msg.attempt})
        ).first()
        if state is None or not _is_current(state, session, msg.attempt):
            return [ack, Cancel(id=msg.id, attempt=msg.attempt, reason="stale")]
        known = OutputState(
            state.output_bytes or 0,
            bool(state.output_truncated),
            -1 if state.top is None else state.top,
        )
        kept = self._kept(msg, known, max_bytes)
        if kept is None:
            return [ack]
        rows, stored = kept
        await tx.conn.execute(tx.db.insert_ignoring_conflicts(_O), rows)
        await tx.conn.execute(EXECUTION_UPDATE_ATTEMPT, self._counted(msg, stored))
        tx.notify(f"output.{msg.id}", msg.id, {"attempt": msg.attempt, "seq": last})
        return [ack]

    @staticmethod
    def _kept(
        msg: Output, known: OutputState, max_bytes: int | None
    ) -> tuple[list[dict[str, Any]], OutputState] | None:
        """The rows of `msg`'s chunks to store, after what the attempt stored (`known`) and
        within its budget, and what it will have stored then; None: nothing to store."""
        budget = OutputBudget(max_bytes, known.bytes, known.truncated)
        # A node sends an attempt's chunks in order and Weaver applies one node's frames in
        # order, so a chunk at or below the last one stored is a replay: not stored again,
        # nor counted again.
        top = known.top
        rows = []
        for chunk in sorted(msg.chunks, key=lambda c: c.seq):
            if chunk.seq <= top:
                continue
            top = chunk.seq
            # PostgreSQL text cannot hold NUL; every store gets the same replacement.
            data = budget.take(chunk.data.replace("\x00", "\ufffd"))
            if data is None:
                break
            rows.append(
                {
                    "execution_id": msg.id,
                    "attempt": msg.attempt,
                    "seq": chunk.seq,
                    "stream": chunk.stream,
                    "data": data,
                }
            )
        if not rows:
            return None
        return rows, OutputState(budget.used, budget.truncated, top)

    @staticmethod
    def _counted(msg: Output, stored: OutputState) -> dict[str, Any]:
        return {
            "_id": msg.id,
            "_attempt": msg.attempt,
            "output_bytes": stored.bytes,
            "output_truncated": stored.truncated,
        }

    async def refused(
        self, tx: Tx, session: NodeSession, kind: str | None, execution_id: str, attempt: int
    ) -> list[WeaverMessage]:
        """The node sent a `kind` frame about this attempt that is outside the protocol: the
        execution fails with INVALID_REPORT (its process is killed), since what the node
        observed of it is lost. An exit report is still acknowledged, so that the node stops
        replaying it."""
        replies: list[WeaverMessage] = []
        if kind == "exited":
            key = (execution_id, attempt)

            def release() -> None:
                if session.release(key):
                    self._on_capacity()

            tx.after_commit.append(release)
            replies.append(Ack(id=execution_id, attempt=attempt, exited=True))
        row = await _current(tx, execution_id)
        if not _is_current(row, session, attempt) or is_terminal(ExecutionState(row.state)):
            return replies
        if row.state == ExecutionState.OPEN.value:
            await transition(tx, row, Event.START)
            row = await _current(tx, execution_id)
        if row.state == ExecutionState.RUNNING.value:
            await transition(tx, row, Event.FAIL, error=INVALID_REPORT)
        if kind != "exited":
            replies.append(Cancel(id=execution_id, attempt=attempt, reason=INVALID_REPORT))
        return replies

    @staticmethod
    def _facts(session: NodeSession, resources: Resources, msg: Exited) -> dict[str, Any]:
        """What the node observed of an ended attempt, kept whatever the execution's state.
        (Its cost is the usage ledger's: `services.usage`.)"""
        return {
            "exit_code": msg.exit_code,
            "output_chunks": msg.chunks,
            "duration_ms": msg.usage.wall_ms,
        }

    async def exited(self, tx: Tx, session: NodeSession, msg: Exited) -> list[WeaverMessage]:
        key = (msg.id, msg.attempt)

        def release() -> None:
            if session.release(key):
                self._on_capacity()

        tx.after_commit.append(release)
        if session.reliability < 1.0:  # nothing to write while it has lost no work lately
            # Observed once committed: a batch run again must not count it twice.
            tx.after_commit.append(lambda: session.observe(1.0))
            # From the stored value: the reconciler of another replica may have lowered it.
            column = tables.nodes.c.reliability
            await tx.conn.execute(
                update(tables.nodes)
                .where(tables.nodes.c.id == session.node_id)
                .values(reliability=column + RELIABILITY_ALPHA * (1.0 - column))
            )
        ack: list[WeaverMessage] = [Ack(id=msg.id, attempt=msg.attempt, exited=True)]
        outcome = exit_outcome(msg.exit_code, msg.reason and msg.reason[:_REASON_MAX])
        held = session.attempts.get(key)
        if held is not None and held.kind is not None and msg.exit_code == 0:
            kind, cpu_ms = held.kind, msg.usage.cpu_ms

            def sample() -> None:
                session.speed = self._speeds.sample(kind, cpu_ms, session.speed)

            tx.after_commit.append(sample)
        if held is not None and not held.settled:
            # The usual case, decided without reading the row: running on this node, now ended.
            expected = Expected(
                msg.id, held.tenant_id, "running", msg.attempt, session.node_id, held.batch
            )
            ending = {
                "result": msg.result,
                "error": outcome.reason,
                **self._facts(session, held.resources, msg),
            }
            if await transition(tx, expected, outcome.event, **ending):
                return ack
        row = await _current(tx, msg.id)
        if not _is_current(row, session, msg.attempt):
            return ack
        facts = self._facts(session, Resources.model_validate(row.resources), msg)
        if row.state == ExecutionState.OPEN.value:
            await transition(tx, row, Event.START)
            row = await _current(tx, msg.id)
        if row.state == ExecutionState.RUNNING.value:
            await transition(
                tx, row, outcome.event, result=msg.result, error=outcome.reason, **facts
            )
        else:
            # Already ended (cancelled, or by the backstop): keep what the node observed.
            await tx.conn.execute(
                EXECUTION_UPDATE_ATTEMPT, {"_id": msg.id, "_attempt": msg.attempt, **facts}
            )
            tx.ended(msg.id)
            tx.notify(f"execution.{msg.id}", msg.id, {"state": row.state, "settled": True})
        return ack


def retry_placement(decided: Any, lost_on: str | None) -> dict[str, Any] | None:
    """What the next placement of an execution keeps from the last one: the invoke's
    strategy, and the nodes (and, for spot nodes, the regions) where attempts were lost,
    which it avoids."""
    if not isinstance(decided, dict):
        return None
    kept: dict[str, Any] = {}
    if decided.get("requested_strategy"):
        kept["requested_strategy"] = decided["requested_strategy"]
    avoid_nodes = list(decided.get("avoid_nodes") or [])
    avoid_regions = list(decided.get("avoid_regions") or [])
    if lost_on is not None:
        avoid_nodes.append(lost_on)
        if decided.get("spot") and decided.get("region"):
            avoid_regions.append(decided["region"])
    if avoid_nodes:
        kept["avoid_nodes"] = sorted(set(avoid_nodes))
    if avoid_regions:
        kept["avoid_regions"] = sorted(set(avoid_regions))
    return kept or None
