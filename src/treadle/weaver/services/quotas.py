"""Tenants' quotas and budgets (`treadle.domain.quotas`), as the store holds them: what each
tenant's work holds and spent, checked before new work is stored, and a hard budget enforced
on running work by the leading replica.

Admission reads the use and stores the new work under one lock per tenant (with limits) on
each replica: two requests at once on one replica are admitted one after the other, the
second counting what the first stored. Requests to different replicas at once may still both
pass where only one fits, by at most one workload (or batch) each.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select, update

from treadle.domain.errors import LimitExceeded
from treadle.domain.quotas import (
    InUse,
    TenantLimits,
    admissible,
    admit,
    over_budget,
    period_start,
)
from treadle.domain.resources import Resources
from treadle.weaver.store import tables

# How many of a batch's items are admitted, and the refusal of the rest.
Admitted = tuple[int, LimitExceeded | None]

if TYPE_CHECKING:
    from treadle.weaver.core import Weaver

__all__ = ["QuotaService"]

log = logging.getLogger(__name__)

_T, _E, _S, _U = tables.tenants, tables.executions, tables.sandboxes, tables.usage_records
_HOLDING = ("open", "running")
_ENDED = ("stopped", "failed")
_ENFORCE_S = 2.0
# How long a tenant's limits, once read, stand on this replica: what another replica set
# applies here within this time, what this one set at once.
_LIMITS_TTL_S = 1.0
_LIMITS_CACHED = 10_000


class QuotaService:
    def __init__(self, weaver: Weaver) -> None:
        self._weaver = weaver
        self._task: asyncio.Task[None] | None = None
        self._warned: dict[str, float] = {}  # tenant -> the period it was warned in
        # tenant -> its limits as last read, and until when they stand (monotonic)
        self._limits: dict[str, tuple[TenantLimits | None, float]] = {}
        # tenant -> the lock its admissions take turns by (while any holds or waits for it)
        self._turns: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()

    async def limits(self, tenant_id: str) -> TenantLimits | None:
        # Every invoke asks: read at most once a second per tenant, not once per invoke.
        cached = self._limits.get(tenant_id)
        if cached is not None and cached[1] > time.monotonic():
            return cached[0]
        async with self._weaver.db.read() as conn:
            raw = (await conn.execute(select(_T.c.limits).where(_T.c.id == tenant_id))).scalar()
        found = None if not raw else TenantLimits.model_validate(raw)
        if len(self._limits) > _LIMITS_CACHED:
            self._limits.clear()
        self._limits[tenant_id] = (found, time.monotonic() + _LIMITS_TTL_S)
        return found

    async def set_limits(self, tenant_id: str, limits: TenantLimits | None) -> None:
        value = None if limits is None else limits.model_dump(exclude_none=True)

        async def write(tx: Any) -> None:
            await tx.conn.execute(update(_T).where(_T.c.id == tenant_id).values(limits=value))

        await self._weaver.writer.run(write)
        self._limits.pop(tenant_id, None)

    async def in_use(self, tenant_id: str, period: str = "month") -> InUse:
        """What the tenant's work holds now (its open and running executions, its sandboxes
        that have not ended), and what it cost since the period began."""
        async with self._weaver.db.read() as conn:
            executions = (
                await conn.execute(
                    select(_E.c.resources).where(
                        _E.c.tenant_id == tenant_id, _E.c.state.in_(_HOLDING)
                    )
                )
            ).all()
            sandboxes = (
                await conn.execute(
                    select(_S.c.spec).where(
                        _S.c.tenant_id == tenant_id,
                        _S.c.status.notin_(_ENDED),
                        _S.c.desired != "stopped",
                    )
                )
            ).all()
            spent = (
                await conn.execute(
                    select(func.coalesce(func.sum(_U.c.cost), 0.0)).where(
                        _U.c.tenant_id == tenant_id, _U.c.end >= period_start(period)
                    )
                )
            ).scalar()
        used = InUse(sandboxes=len(sandboxes), spent=float(spent or 0.0))
        reserved = [row.resources for row in executions]
        reserved += [(row.spec or {}).get("resources") for row in sandboxes]
        for raw in reserved:
            try:
                held = Resources.model_validate(raw or {})
            except ValueError:
                continue
            used.cpu_millicores += held.cpu_millicores
            used.memory_mib += held.memory_mib
            used.gpus += held.gpu_count
        return used

    @asynccontextmanager
    async def admit(
        self, tenant_id: str, asked: Resources, *, sandbox: bool
    ) -> AsyncIterator[None]:
        """Refuse (`LimitExceeded`) new work of the tenant's that would pass a limit; what
        is admitted is to be stored within, the tenant's next admission waiting for it."""
        limits = await self.limits(tenant_id)
        if limits is None:
            yield
            return
        async with self._turn(tenant_id):
            admit(limits, await self.in_use(tenant_id, limits.period), asked, sandbox=sandbox)
            yield

    @asynccontextmanager
    async def admissible(
        self, tenant_id: str, asked: Resources, count: int
    ) -> AsyncIterator[Admitted]:
        """How many of `count` executions, each reserving `asked`, the tenant's limits admit
        now (the first ones of a batch), and the refusal of the rest; what is admitted is to
        be stored within, as with `admit`."""
        limits = await self.limits(tenant_id)
        if limits is None:
            yield count, None
            return
        async with self._turn(tenant_id):
            yield admissible(limits, await self.in_use(tenant_id, limits.period), asked, count)

    def _turn(self, tenant_id: str) -> asyncio.Lock:
        lock = self._turns.get(tenant_id)
        if lock is None:
            lock = self._turns[tenant_id] = asyncio.Lock()
        return lock

    # a hard budget, enforced

    def start(self) -> None:
        self._task = asyncio.create_task(self._enforce(), name="treadle-budgets")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _enforce(self) -> None:
        while True:
            await asyncio.sleep(_ENFORCE_S)
            if not self._weaver.leads:
                continue
            try:
                await self.enforce()
            except Exception:
                log.exception("enforcing budgets failed; trying again")

    async def enforce(self) -> None:
        """Stop (or pause) the running work of every tenant whose hard budget is spent, and
        warn, once a period, of those whose soft budget is."""
        async with self._weaver.db.read() as conn:
            query = select(_T.c.id, _T.c.limits).where(_T.c.limits.is_not(None))
            rows = (await conn.execute(query)).all()
        for row in rows:
            limits = TenantLimits.model_validate(row.limits)
            if limits.budget is None:
                continue
            used = await self.in_use(row.id, limits.period)
            if not over_budget(limits, used.spent):
                continue
            if not limits.hard:
                since = period_start(limits.period)
                if self._warned.get(row.id) != since:
                    self._warned[row.id] = since
                    log.warning(
                        "tenant %s spent %.6g of its soft budget of %g this %s",
                        row.id,
                        used.spent,
                        limits.budget,
                        limits.period,
                    )
                continue
            await self._weaver.sandboxes.over_budget(row.id, limits.on_exceeded)
            await self._weaver.executions.over_budget(row.id)
