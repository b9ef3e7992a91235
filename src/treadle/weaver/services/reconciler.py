"""Heals the fleet: a node that has been silent for `node_down_after_s` is down, and the work
it held runs again elsewhere (DESIGN §3).

A node is silent when it has no link, or when its link carried nothing (no heartbeat, no
report) for that long: a half-open TCP connection looks alive to the socket but not here.
Its executions that never started are placed again; those that started run again as a new
attempt when attempts are left, else they fail with `node_lost`. A node that comes back in
time re-attaches to its attempts through the reconcile of its hello instead.

Every replica closes the links that went silent and records, twice a node-down period, when
it last heard from each node it holds (`nodes.last_heartbeat`). One replica, the leader
(see leadership.py), judges from those records which nodes are down, whichever replica they
were connected to, and expires work that waited too long for a node.

When a replica starts leading (at start, or when the previous leader died), nodes it has not
heard from since get a longer grace: they need a few reconnect attempts with backoff to find
a live Weaver, and their work is still running.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from sqlalchemy import bindparam, case, func, select, union, update

from treadle.domain.node import NodeState
from treadle.domain.sandbox import ON_NODE_STATUSES
from treadle.weaver.background import cancel_and_wait
from treadle.weaver.services.executions import ExecutionService
from treadle.weaver.services.fleet import order_disconnect
from treadle.weaver.services.leadership import Leadership
from treadle.weaver.services.nodes import (
    RELIABILITY_ALPHA,
    NodeRegistry,
    NodeSession,
    record_node_state,
)
from treadle.weaver.services.reports import ReportService
from treadle.weaver.services.retention import Retention
from treadle.weaver.services.sandboxes import SandboxService
from treadle.weaver.store import tables
from treadle.weaver.store.database import Database
from treadle.weaver.store.statements import ACTIVE_STATE_VALUES
from treadle.weaver.store.writer import Tx, Writer

__all__ = ["Reconciler"]

log = logging.getLogger(__name__)
_E = tables.executions
_N = tables.nodes
_SB = tables.sandboxes
SANDBOX_ON_NODE = [s.value for s in ON_NODE_STATUSES]
# A node's old replica may record its disconnect after the node already joined another one:
# the replica that hears from it sets it straight.
_HEARD = (
    update(_N)
    .where(_N.c.id == bindparam("_id"))
    .values(
        last_heartbeat=bindparam("seen"),
        state=case(
            (_N.c.state == NodeState.DISCONNECTED.value, NodeState.READY.value),
            else_=_N.c.state,
        ),
    )
)


class Reconciler:
    def __init__(
        self,
        db: Database,
        writer: Writer,
        registry: NodeRegistry,
        reports: ReportService,
        down_after_s: float,
        startup_grace_s: float,
        executions: ExecutionService,
        unschedulable_after_s: float,
        forget: Callable[[str], None],
        leadership: Leadership,
        sandboxes: SandboxService | None = None,
        retention: Retention | None = None,
    ) -> None:
        self._db = db
        self._writer = writer
        self._registry = registry
        self._reports = reports
        self._down_after_s = down_after_s
        self._startup_grace_s = startup_grace_s
        self._executions = executions
        self._unschedulable_after_s = unschedulable_after_s
        self._forget = forget
        self._leadership = leadership
        self._sandboxes = sandboxes
        self._retention = retention
        # wall-clock time this replica began to lead; None while it follows
        self.leading_since: float | None = None
        self._next_expiry = 0.0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="treadle-reconciler")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None
        await self._leadership.release()
        self.leading_since = None

    async def _loop(self) -> None:
        interval = max(0.05, self._down_after_s / 6)
        while True:
            await asyncio.sleep(interval)
            try:
                await self.tick()
            except Exception:
                log.exception("reconcile pass failed; trying again")

    async def tick(self) -> None:
        await self._local_links()
        if not await self._leadership.held():
            if self.leading_since is not None:
                log.warning("this replica no longer reconciles the fleet")
            self.leading_since = None
            return
        if self.leading_since is None:
            self.leading_since = time.time()
            self._next_expiry = 0.0
            log.info("this replica now reconciles the fleet")
        await self._nodes_down(self.leading_since)
        # Node silence is judged in fractions of a second; a deadline of minutes needs a
        # look only every tenth of it.
        now = time.monotonic()
        if now >= self._next_expiry:
            self._next_expiry = now + self._unschedulable_after_s / 10
            await self._expire_unschedulable()
        if self._retention is not None:
            try:
                await self._retention.tick()
            except Exception:
                log.exception("removing ended history failed; trying again")

    async def _expire_unschedulable(self) -> None:
        stale = await self._executions.unschedulable(time.time() - self._unschedulable_after_s)
        if stale:
            for execution_id in await self._executions.give_up(stale, "unschedulable"):
                self._forget(execution_id)

    async def _local_links(self) -> None:
        """Close the links that went silent; record when the others were last heard from."""
        mono, wall = time.monotonic(), time.time()
        heard: list[tuple[NodeSession, float]] = []
        for session in self._registry.sessions():
            if mono - session.last_seen > self._down_after_s:
                log.warning("node %s went silent; closing its link", session.node_id)
                session.close()
                self._registry.remove(session)
            else:
                heard.append((session, wall - (mono - session.last_seen)))
        if heard:

            async def write(tx: Tx) -> None:
                # Only links still open when this commits: a disconnect recorded after it
                # must not be overwritten by an older "heard from".
                live = [
                    {"_id": session.node_id, "seen": seen}
                    for session, seen in heard
                    if self._registry.get(session.node_id) is session
                ]
                if live:
                    await tx.conn.execute(_HEARD, live)

            await self._writer.run(write)

    async def _nodes_down(self, leading_since: float) -> None:
        holding = union(
            select(_E.c.node_id).where(
                _E.c.state.in_(ACTIVE_STATE_VALUES), _E.c.node_id.is_not(None)
            ),
            select(_SB.c.node_id).where(
                _SB.c.status.in_(SANDBOX_ON_NODE), _SB.c.node_id.is_not(None)
            ),
        ).scalar_subquery()
        async with self._db.read() as conn:
            rows = list(
                await conn.execute(select(_N.c.id, _N.c.last_heartbeat).where(_N.c.id.in_(holding)))
            )
        now = time.time()
        for row in rows:
            node_id: str = row.id
            if self._registry.present(node_id):
                continue
            seen: float = row.last_heartbeat or 0.0
            unheard_since_leading = seen < leading_since
            if unheard_since_leading and now - leading_since < self._startup_grace_s:
                continue
            if now - max(seen, leading_since) >= self._down_after_s:
                await self._writer.run(self._node_down(node_id, seen))

    def _node_down(self, node_id: str, seen: float) -> Callable[[Tx], Awaitable[None]]:
        async def write(tx: Tx) -> None:
            # Unless it came back meanwhile, here or to another replica.
            if self._registry.present(node_id):
                return
            latest = (
                await tx.conn.execute(select(_N.c.last_heartbeat).where(_N.c.id == node_id))
            ).scalar_one_or_none()
            if latest is not None and latest > seen:
                return
            log.warning("node %s is down; its work runs again elsewhere", node_id)
            await record_node_state(tx, node_id, NodeState.DOWN)
            order_disconnect(tx, node_id)
            await self._reports.release_node(tx, node_id)
            if self._sandboxes is not None:
                await self._sandboxes.node_lost(tx, node_id)
            # Losing work counts against the node where placement weighs reliability.
            await tx.conn.execute(
                update(_N)
                .where(_N.c.id == node_id)
                .values(reliability=func.coalesce(_N.c.reliability, 1.0) * (1 - RELIABILITY_ALPHA))
            )

        return write
