"""Places open executions on connected nodes.

New executions arrive in memory from invoke; a periodic scan of the store picks up anything
else that is open and unassigned (after a restart, a lost assignment, a requeue). One task
places everything pending per round, commits all assignments in one transaction
(compare-and-swap on state, attempt and an empty node), and only then sends them.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from sqlalchemy import bindparam, select

from treadle.domain.function import render_command
from treadle.domain.resources import Tier
from treadle.protocol import Assign, AssignSpec
from treadle.scheduler import Placement, Request, Unschedulable, place
from treadle.weaver.background import cancel_and_wait
from treadle.weaver.services.executions import ExecutionService
from treadle.weaver.services.functions import FunctionRecord, FunctionService
from treadle.weaver.services.nodes import NodeRegistry, NodeSession
from treadle.weaver.store import tables
from treadle.weaver.store.statements import EXECUTION_ASSIGN
from treadle.weaver.store.writer import Tx, Writer

__all__ = ["Dispatcher", "Pending"]

log = logging.getLogger(__name__)
_E = tables.executions
_SCAN_INTERVAL_S = 2.0
# Replicas placing the same open work (PostgreSQL): each assigns only the rows it could
# lock, and skips those another replica is assigning instead of waiting for its commit.
_CLAIM = (
    select(_E.c.id)
    .where(
        _E.c.id.in_(bindparam("ids", expanding=True)),
        _E.c.state == "open",
        _E.c.node_id.is_(None),
    )
    .with_for_update(skip_locked=True)
)


@dataclass(slots=True)
class Pending:
    id: str
    tenant_id: str
    attempt: int
    function: FunctionRecord
    args: dict[str, Any]
    stdin: str | None
    reason: str | None = None

    @classmethod
    def from_row(cls, row: Any, function: FunctionRecord) -> Pending:
        return cls(
            id=row.id,
            tenant_id=row.tenant_id,
            attempt=row.attempt,
            function=function,
            args=row.args,
            stdin=row.stdin,
            reason=row.pending_reason,
        )

    @property
    def request(self) -> Request:
        spec = self.function.spec
        return Request(
            resources=spec.resources,
            isolation=spec.isolation,
            min_isolation=spec.tier_floor,
            labels=spec.placement.labels,
            regions=tuple(spec.placement.regions),
        )

    def assignment(self, tier: Tier) -> Assign:
        spec = self.function.spec
        return Assign(
            spec=AssignSpec(
                id=self.id,
                attempt=self.attempt,
                tenant_id=self.tenant_id,
                function=spec.name,
                version=self.function.version,
                argv=render_command(spec.command, self.args),
                env=spec.env,
                source=spec.source,
                source_name=spec.source_name,
                args=self.args,
                stdin=self.stdin,
                timeout_s=spec.timeout_s,
                resources=spec.resources,
                isolation=tier,
                image=spec.image,
                network=spec.network,
            )
        )


@dataclass(slots=True)
class _Decision:
    pending: Pending
    session: NodeSession
    placement: Placement
    tier: Tier
    # False when the node already held this attempt (it was placed twice): then this
    # decision must not release what the first placement reserved.
    reserved: bool

    @property
    def key(self) -> tuple[str, int]:
        return self.pending.id, self.pending.attempt

    def undo(self) -> None:
        if self.reserved:
            self.session.release(self.key)


class Dispatcher:
    def __init__(
        self,
        writer: Writer,
        registry: NodeRegistry,
        executions: ExecutionService,
        functions: FunctionService,
    ) -> None:
        self._writer = writer
        self._registry = registry
        self._executions = executions
        self._functions = functions
        self._pending: dict[str, Pending] = {}
        self._wake = asyncio.Event()
        self._scan_due = True
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._loop(), name="treadle-dispatcher"),
            asyncio.create_task(self._scan_timer(), name="treadle-dispatch-scan"),
        ]

    async def stop(self) -> None:
        await cancel_and_wait(*self._tasks)
        self._tasks = []

    def enqueue(self, pending: Pending) -> None:
        self._pending.setdefault(pending.id, pending)
        self._wake.set()

    def forget(self, execution_id: str) -> None:
        self._pending.pop(execution_id, None)

    def wake(self) -> None:
        self._wake.set()

    def scan_soon(self) -> None:
        self._scan_due = True
        self._wake.set()

    async def _scan_timer(self) -> None:
        while True:
            await asyncio.sleep(_SCAN_INTERVAL_S)
            self.scan_soon()

    async def _loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                if self._scan_due:
                    self._scan_due = False
                    await self._scan()
                await self._round()
            except Exception:
                log.exception("dispatch round failed; retrying on the next wake-up")
                self.scan_soon()

    async def _scan(self) -> None:
        # After a restart every open execution comes through here: read each function
        # version once, not once per execution.
        versions: dict[tuple[str, str, int], FunctionRecord | None] = {}
        for row in await self._executions.open_unassigned(exclude=set(self._pending)):
            key = (row.tenant_id, row.function, row.version)
            if key not in versions:
                try:
                    versions[key] = await self._functions.get(*key, include_deleted=True)
                except Exception:
                    log.exception("execution %s names a function that cannot be loaded", row.id)
                    versions[key] = None
            function = versions[key]
            if function is not None:
                self._pending.setdefault(row.id, Pending.from_row(row, function))

    async def _round(self) -> None:
        if not self._pending:
            return
        sessions = {s.node_id: s for s in self._registry.sessions()}
        views = {node_id: s.view() for node_id, s in sessions.items()}
        decisions: list[_Decision] = []
        reasons: list[Pending] = []
        # Within a round, what did not fit for one function version fits no better for the
        # next execution of it: remember the answer instead of scanning every node again.
        unschedulable: dict[tuple[str, str, int], Unschedulable] = {}
        for pending in list(self._pending.values()):
            shape = (pending.tenant_id, pending.function.spec.name, pending.function.version)
            result = unschedulable.get(shape) or place(pending.request, views.values())
            if isinstance(result, Unschedulable):
                unschedulable[shape] = result
            if isinstance(result, Placement):
                session = sessions[result.node_id]
                spec = pending.function.spec
                tier = spec.isolation or session.tier_for(spec.tier_floor)
                reserved = session.reserve(
                    (pending.id, pending.attempt),
                    pending.function.spec.resources,
                    pending.tenant_id,
                )
                views[session.node_id] = session.view()
                del self._pending[pending.id]
                decisions.append(_Decision(pending, session, result, tier, reserved))
            elif pending.reason != result.message:
                pending.reason = result.message
                reasons.append(pending)
        if not decisions and not reasons:
            return
        try:
            assigned = await self._writer.run(self._record(decisions, reasons))
        except Exception:
            for decision in decisions:
                decision.undo()
                self._pending.setdefault(decision.pending.id, decision.pending)
            raise
        for decision in decisions:
            if decision.pending.id not in assigned:
                decision.undo()
                continue
            current = self._registry.get(decision.session.node_id)
            if current is None:
                continue  # gone while this was committed: the reconciler moves the work
            if current is not decision.session:
                # The node reconnected meanwhile; its new session must hold and send it.
                decision.undo()
                current.reserve(
                    decision.key,
                    decision.pending.function.spec.resources,
                    decision.pending.tenant_id,
                )
            current.send(decision.pending.assignment(decision.tier))

    @staticmethod
    def _record(decisions: list[_Decision], reasons: list[Pending]) -> Any:
        async def write(tx: Tx) -> set[str]:
            assigned: set[str] = set()
            claimed: set[str] | None = None
            if decisions and tx.db.dialect == "postgresql":
                ids = [d.pending.id for d in decisions]
                claimed = set((await tx.conn.execute(_CLAIM, {"ids": ids})).scalars())
            for d in decisions:
                if claimed is not None and d.pending.id not in claimed:
                    continue
                placement = {
                    "node_id": d.placement.node_id,
                    "score": d.placement.score,
                    "breakdown": dict(d.placement.breakdown),
                    "rejected": dict(d.placement.rejected),
                    "tier": d.tier.value,
                }
                result = await tx.conn.execute(
                    EXECUTION_ASSIGN,
                    {
                        "_id": d.pending.id,
                        "_attempt": d.pending.attempt,
                        "node_id": d.session.node_id,
                        "placement": placement,
                        "isolation": d.tier.value,
                        "pending_reason": None,
                    },
                )
                if result.rowcount == 1:
                    assigned.add(d.pending.id)
            for pending in reasons:
                # Only while still unplaced: another replica may have placed it meanwhile.
                await tx.conn.execute(
                    EXECUTION_ASSIGN,
                    {
                        "_id": pending.id,
                        "_attempt": pending.attempt,
                        "pending_reason": pending.reason,
                    },
                )
            return assigned

        return write
