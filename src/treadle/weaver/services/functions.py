"""Functions: immutable versions; `name` alone means the latest live version."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, select, update

from treadle.domain.errors import Forbidden, NotFound
from treadle.domain.function import STORED, FunctionSpec
from treadle.scheduler import tiers
from treadle.weaver.services.auth import process_tier_tenants
from treadle.weaver.store import tables
from treadle.weaver.store.database import Database
from treadle.weaver.store.writer import Tx, Writer

__all__ = ["FunctionRecord", "FunctionService"]

# Invoke reads the latest version on every call; a short cache keeps that off the database.
# Writes through this service invalidate it at once; the TTL bounds staleness elsewhere.
_CACHE_TTL_S = 2.0


@dataclass(frozen=True, slots=True)
class FunctionRecord:
    tenant_id: str
    spec: FunctionSpec
    version: int
    created_at: float
    # Its resources as stored on each execution: worked out once, shared by them all.
    resources_json: dict[str, Any] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "resources_json", self.spec.resources.model_dump(mode="json"))

    def view(self) -> dict[str, Any]:
        body = self.spec.model_dump(mode="json")
        body.update(version=self.version, tenant_id=self.tenant_id, created_at=self.created_at)
        return body


def _record(row: Any) -> FunctionRecord:
    return FunctionRecord(
        tenant_id=row.tenant_id,
        spec=FunctionSpec.model_validate(row.spec, context={STORED: True}),
        version=row.version,
        created_at=row.created_at,
    )


class FunctionService:
    def __init__(self, db: Database, writer: Writer) -> None:
        self._db = db
        self._writer = writer
        self._latest: dict[tuple[str, str], tuple[FunctionRecord, float]] = {}

    async def create(self, tenant_id: str, spec: FunctionSpec) -> tuple[FunctionRecord, bool]:
        """Store `spec` as the next version; an identical spec returns the latest version."""
        if tiers.names_process(spec):
            async with self._db.read() as conn:
                allowed = tenant_id in await process_tier_tenants(conn)
            if not allowed:
                raise Forbidden(
                    tiers.PROCESS_NOT_ALLOWED, code="tier_not_allowed", details={"tier": "process"}
                )
        body = spec.model_dump(mode="json")
        t = tables.functions

        async def write(tx: Tx) -> tuple[FunctionRecord, bool]:
            latest = (
                await tx.conn.execute(
                    select(t)
                    .where(t.c.tenant_id == tenant_id, t.c.name == spec.name)
                    .order_by(t.c.version.desc())
                    .limit(1)
                )
            ).first()
            if latest is not None and latest.deleted_at is None and latest.spec == body:
                return _record(latest), False
            version = 1 if latest is None else latest.version + 1
            await tx.conn.execute(
                t.insert().values(
                    tenant_id=tenant_id,
                    name=spec.name,
                    version=version,
                    spec=body,
                    created_at=tx.now,
                )
            )
            tx.emit("function.created", spec.name, tenant_id, {"version": version})
            return FunctionRecord(tenant_id, spec, version, tx.now), True

        record, created = await self._writer.run(write)
        self._latest.pop((tenant_id, spec.name), None)
        return record, created

    async def get(
        self,
        tenant_id: str,
        name: str,
        version: int | None = None,
        *,
        include_deleted: bool = False,
    ) -> FunctionRecord:
        """The latest live version, or `version` (also of a deleted function with
        include_deleted: executions already made keep running the code they were made for)."""
        key = (tenant_id, name)
        if version is None:
            cached = self._latest.get(key)
            if cached is not None and cached[1] > time.monotonic():
                return cached[0]
        t = tables.functions
        query = select(t).where(t.c.tenant_id == tenant_id, t.c.name == name)
        if not include_deleted:
            query = query.where(t.c.deleted_at.is_(None))
        if version is not None:
            query = query.where(t.c.version == version)
        async with self._db.read() as conn:
            row = (await conn.execute(query.order_by(t.c.version.desc()).limit(1))).first()
        if row is None:
            what = f"function {name!r}" + (f" version {version}" if version is not None else "")
            raise NotFound(f"{what} not found", details={"function": name, "version": version})
        record = _record(row)
        if version is None:
            self._latest[key] = (record, time.monotonic() + _CACHE_TTL_S)
        return record

    async def latest_versions(self, tenant_id: str) -> list[FunctionRecord]:
        t = tables.functions
        latest = (
            select(t.c.name, func.max(t.c.version).label("version"))
            .where(t.c.tenant_id == tenant_id, t.c.deleted_at.is_(None))
            .group_by(t.c.name)
            .subquery()
        )
        query = (
            select(t)
            .join(latest, (t.c.name == latest.c.name) & (t.c.version == latest.c.version))
            .where(t.c.tenant_id == tenant_id)
            .order_by(t.c.name)
        )
        async with self._db.read() as conn:
            return [_record(row) for row in await conn.execute(query)]

    async def delete(self, tenant_id: str, name: str) -> None:
        t = tables.functions

        async def write(tx: Tx) -> None:
            result = await tx.conn.execute(
                update(t)
                .where(t.c.tenant_id == tenant_id, t.c.name == name, t.c.deleted_at.is_(None))
                .values(deleted_at=tx.now)
            )
            if result.rowcount == 0:
                raise NotFound(f"function {name!r} not found", details={"function": name})
            tx.emit("function.deleted", name, tenant_id, {})

        await self._writer.run(write)
        self._latest.pop((tenant_id, name), None)
