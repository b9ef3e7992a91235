"""Heals the fleet: a node that has been silent for `node_down_after_s` is down, and the work
it held runs again elsewhere (DESIGN §3).

A node is silent when it has no link, or when its link carried nothing (no heartbeat, no
report) for that long: a half-open TCP connection looks alive to the socket but not here.
Its executions that never started are placed again; those that started run again as a new
attempt when attempts are left, else they fail with `node_lost`. A node that comes back in
time re-attaches to its attempts through the reconcile of its hello instead.

Right after Weaver starts, nodes get a longer grace: they need a few reconnect attempts with
backoff to find the new process, and their work is still running.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from sqlalchemy import distinct, select

from treadle.domain.node import NodeState
from treadle.weaver.background import cancel_and_wait
from treadle.weaver.services.executions import ExecutionService
from treadle.weaver.services.nodes import NodeRegistry, record_node_state
from treadle.weaver.services.reports import ReportService
from treadle.weaver.store import tables
from treadle.weaver.store.database import Database
from treadle.weaver.store.statements import ACTIVE_STATE_VALUES
from treadle.weaver.store.writer import Tx, Writer

__all__ = ["Reconciler"]

log = logging.getLogger(__name__)
_E = tables.executions


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
        self._started = 0.0  # set by start(): the startup grace counts from there
        self._next_expiry = 0.0
        self._silent_since: dict[str, float] = {}
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._started = time.monotonic()
        self._task = asyncio.create_task(self._loop(), name="treadle-reconciler")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    async def _loop(self) -> None:
        interval = max(0.05, self._down_after_s / 6)
        while True:
            await asyncio.sleep(interval)
            try:
                await self.tick()
            except Exception:
                log.exception("reconcile pass failed; trying again")

    async def tick(self) -> None:
        await self._nodes()
        # Node silence is judged in fractions of a second; a deadline of minutes needs a
        # look only every tenth of it.
        now = time.monotonic()
        if now >= self._next_expiry:
            self._next_expiry = now + self._unschedulable_after_s / 10
            await self._expire_unschedulable()

    async def _expire_unschedulable(self) -> None:
        stale = await self._executions.unschedulable(time.time() - self._unschedulable_after_s)
        if stale:
            for execution_id in await self._executions.give_up(stale, "unschedulable"):
                self._forget(execution_id)

    async def _nodes(self) -> None:
        now = time.monotonic()
        for session in self._registry.sessions():
            if now - session.last_seen > self._down_after_s:
                log.warning("node %s went silent; closing its link", session.node_id)
                session.close()
                self._registry.remove(session)
        async with self._db.read() as conn:
            holding = set(
                (
                    await conn.execute(
                        select(distinct(_E.c.node_id)).where(
                            _E.c.state.in_(ACTIVE_STATE_VALUES), _E.c.node_id.is_not(None)
                        )
                    )
                ).scalars()
            )
        grace = max(self._down_after_s, self._startup_grace_s - (now - self._started))
        for node_id in list(self._silent_since):
            if self._registry.present(node_id) or node_id not in holding:
                del self._silent_since[node_id]
        for node_id in holding:
            if self._registry.present(node_id):
                continue
            since = self._silent_since.setdefault(node_id, now)
            if now - since >= grace:
                await self._writer.run(self._node_down(node_id))
                del self._silent_since[node_id]

    def _node_down(self, node_id: str) -> Callable[[Tx], Awaitable[None]]:
        async def write(tx: Tx) -> None:
            if not self._registry.present(node_id):  # unless it came back meanwhile
                await self._mark_down(tx, node_id)

        return write

    async def _mark_down(self, tx: Tx, node_id: str) -> None:
        log.warning("node %s is down; its work runs again elsewhere", node_id)
        await record_node_state(tx, node_id, NodeState.DOWN)
        await self._reports.release_node(tx, node_id)
