"""API keys, tenants, join tokens and node credentials. Secrets are stored as SHA-256 hashes:
they are 256-bit random strings, so a slow password hash would add nothing but latency."""

from __future__ import annotations

import hashlib
import hmac
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import or_, select, update

from treadle.domain.errors import Conflict, NotFound, Unauthenticated
from treadle.weaver.ids import new_id, new_secret
from treadle.weaver.store import tables
from treadle.weaver.store.database import Conn, Database, direct
from treadle.weaver.store.writer import Tx, Writer
from treadle.weaver.views import iso

__all__ = ["AuthService", "Principal", "hash_secret", "process_tier_tenants"]

DEFAULT_TENANT = "default"
_CACHE_TTL_S = 30.0
_T = tables.tenants


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Principal:
    tenant_id: str
    key_id: str
    admin: bool


async def process_tier_tenants(conn: Conn) -> frozenset[str]:
    """The ids of the tenants the operator allows the process tier (few, usually none)."""
    return frozenset((await conn.execute(_PROCESS_TIER_TENANTS)).scalars())


# Read for each placement that may use the process tier: built once.
_PROCESS_TIER_TENANTS = direct(select(_T.c.id).where(_T.c.allow_process_tier))


def _tenant_view(row: Any) -> dict[str, Any]:
    return {
        "id": row.id,
        "name": row.name,
        "created_at": iso(row.created_at),
        "allow_process_tier": bool(row.allow_process_tier),
    }


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text + "\n")
    os.replace(tmp, path)


class AuthService:
    def __init__(self, db: Database, writer: Writer) -> None:
        self._db = db
        self._writer = writer
        self._cache: dict[str, tuple[Principal, float]] = {}

    async def authenticate(self, api_key: str) -> Principal:
        digest = hash_secret(api_key)
        now = time.monotonic()
        cached = self._cache.get(digest)
        if cached is not None and cached[1] > now:
            return cached[0]
        async with self._db.read() as conn:
            row = (
                await conn.execute(
                    select(
                        tables.api_keys.c.id, tables.api_keys.c.tenant_id, tables.api_keys.c.admin
                    )
                    .where(tables.api_keys.c.key_hash == digest)
                    .where(tables.api_keys.c.revoked_at.is_(None))
                )
            ).first()
        if row is None:
            raise Unauthenticated("unknown API key")
        principal = Principal(tenant_id=row.tenant_id, key_id=row.id, admin=bool(row.admin))
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[digest] = (principal, now + _CACHE_TTL_S)
        return principal

    # tenants and keys

    @staticmethod
    async def _insert_key(tx: Tx, tenant_id: str, admin: bool, key: str) -> str:
        key_id = new_id("key")
        await tx.conn.execute(
            tables.api_keys.insert().values(
                id=key_id,
                tenant_id=tenant_id,
                key_hash=hash_secret(key),
                admin=admin,
                created_at=tx.now,
            )
        )
        return key_id

    async def create_tenant(self, name: str) -> tuple[dict[str, Any], str]:
        key = new_secret("tk")
        tenant_id = new_id("tn")

        async def write(tx: Tx) -> dict[str, Any]:
            exists = await tx.conn.execute(select(_T.c.id).where(_T.c.name == name))
            if exists.first() is not None:
                raise Conflict(f"tenant {name!r} already exists", details={"name": name})
            await tx.conn.execute(_T.insert().values(id=tenant_id, name=name, created_at=tx.now))
            await self._insert_key(tx, tenant_id, False, key)
            return await self._tenant(tx.conn, tenant_id)

        return await self._writer.run(write), key

    @staticmethod
    async def _tenant(conn: Conn, tenant_id: str) -> dict[str, Any]:
        row = (await conn.execute(select(_T).where(_T.c.id == tenant_id))).first()
        if row is None:
            raise NotFound(f"tenant {tenant_id!r} not found", details={"id": tenant_id})
        return _tenant_view(row)

    async def list_tenants(self) -> list[dict[str, Any]]:
        async with self._db.read() as conn:
            rows = await conn.execute(select(_T).order_by(_T.c.name))
            return [_tenant_view(row) for row in rows]

    async def get_tenant(self, tenant_id: str) -> dict[str, Any]:
        async with self._db.read() as conn:
            return await self._tenant(conn, tenant_id)

    async def set_process_tier(self, tenant_id: str, allowed: bool) -> dict[str, Any]:
        """Allow or deny the tenant the process tier. Placement reads the permission again
        before it assigns work to that tier, so a denial holds from the next assignment."""

        async def write(tx: Tx) -> dict[str, Any]:
            await tx.conn.execute(
                update(_T).where(_T.c.id == tenant_id).values(allow_process_tier=allowed)
            )
            return await self._tenant(tx.conn, tenant_id)

        return await self._writer.run(write)

    async def create_key(self, tenant_id: str, admin: bool) -> tuple[str, str]:
        key = new_secret("tk")

        async def write(tx: Tx) -> str:
            found = await tx.conn.execute(
                select(tables.tenants.c.id).where(tables.tenants.c.id == tenant_id)
            )
            if found.first() is None:
                raise NotFound(f"tenant {tenant_id!r} not found")
            return await self._insert_key(tx, tenant_id, admin, key)

        return await self._writer.run(write), key

    # nodes

    async def join_token_valid(self, token: str) -> bool:
        """Whether `token` may register a node now. An expiring token (one Weaver issued
        for a machine it started) is spent by this call, atomically: two joins with it
        cannot both pass."""
        column = tables.join_tokens.c.revoked_at
        hashed = hash_secret(token)
        async with self._db.read() as conn:
            row = (
                await conn.execute(
                    select(column)
                    .where(tables.join_tokens.c.token_hash == hashed)
                    .where(or_(column.is_(None), column > time.time()))
                )
            ).first()
        if row is None:
            return False
        if row.revoked_at is None:  # the operator's own token: reusable
            return True

        async def spend(tx: Tx) -> bool:
            spent = await tx.conn.execute(
                update(tables.join_tokens)
                .where(tables.join_tokens.c.token_hash == hashed, column > tx.now)
                .values(revoked_at=tx.now)
                .returning(tables.join_tokens.c.id)
            )
            return spent.first() is not None

        return await self._writer.run(spend)

    async def issue_join_token(self, ttl_s: float) -> str:
        """A join token for one machine Weaver starts itself: accepted for `ttl_s`, and
        once (`consume_join_token`). It travels to the machine, where it is less safe."""
        token = new_secret("tj")

        async def write(tx: Tx) -> None:
            await tx.conn.execute(
                tables.join_tokens.insert().values(
                    id=new_id("jt"),
                    token_hash=hash_secret(token),
                    created_at=tx.now,
                    revoked_at=tx.now + ttl_s,
                )
            )

        await self._writer.run(write)
        return token

    async def node_credential_valid(self, node_id: str, secret: str) -> bool:
        async with self._db.read() as conn:
            row = (
                await conn.execute(
                    select(tables.nodes.c.secret_hash).where(tables.nodes.c.id == node_id)
                )
            ).first()
        return row is not None and hmac.compare_digest(row.secret_hash, hash_secret(secret))

    # first start

    async def bootstrap(self, home: Path) -> None:
        """Make sure `home` holds a working admin key and join token, creating what is missing.

        A file that exists is trusted and (re)registered, so a wiped database keeps the keys
        the operator already handed out working.
        """
        key_path, token_path = home / "admin.key", home / "join.token"
        admin_key = key_path.read_text().strip() if key_path.exists() else new_secret("tk")
        join_token = token_path.read_text().strip() if token_path.exists() else new_secret("tj")

        async def write(tx: Tx) -> None:
            tenant = (
                await tx.conn.execute(
                    select(tables.tenants.c.id).where(tables.tenants.c.name == DEFAULT_TENANT)
                )
            ).first()
            tenant_id = tenant.id if tenant is not None else new_id("tn")
            if tenant is None:
                await tx.conn.execute(
                    tables.tenants.insert().values(
                        id=tenant_id, name=DEFAULT_TENANT, created_at=tx.now
                    )
                )
            key_known = await tx.conn.execute(
                select(tables.api_keys.c.id).where(
                    tables.api_keys.c.key_hash == hash_secret(admin_key)
                )
            )
            if key_known.first() is None:
                await self._insert_key(tx, tenant_id, True, admin_key)
            token_known = await tx.conn.execute(
                select(tables.join_tokens.c.id).where(
                    tables.join_tokens.c.token_hash == hash_secret(join_token)
                )
            )
            if token_known.first() is None:
                await tx.conn.execute(
                    tables.join_tokens.insert().values(
                        id=new_id("jt"), token_hash=hash_secret(join_token), created_at=tx.now
                    )
                )

        await self._writer.run(write)
        _write_private(key_path, admin_key)
        _write_private(token_path, join_token)
