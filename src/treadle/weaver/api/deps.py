"""Request dependencies: the Weaver, and the caller's principal from its bearer key."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated

from fastapi import Depends, Request
from starlette.requests import HTTPConnection

from treadle.domain.errors import Forbidden, Unauthenticated
from treadle.weaver.core import Weaver
from treadle.weaver.services.auth import Principal

__all__ = [
    "PRINCIPAL",
    "Admin",
    "Caller",
    "WeaverDep",
    "bearer",
    "get_weaver",
    "principal_of",
]

# Where `limits.RequestGuard` keeps the principal of a request it authenticated, in its scope.
PRINCIPAL = "treadle.principal"


def get_weaver(conn: HTTPConnection) -> Weaver:
    weaver: Weaver = conn.app.state.weaver
    return weaver


async def _weaver(conn: HTTPConnection) -> Weaver:
    # A coroutine, not a plain function: FastAPI runs those in its thread pool, two thread
    # hand-offs on every request that asks for Weaver.
    return get_weaver(conn)


WeaverDep = Annotated[Weaver, Depends(_weaver)]


def bearer(headers: Mapping[str, str]) -> str | None:
    value = headers.get("authorization")
    if not value:
        return None
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


async def principal_of(conn: HTTPConnection) -> Principal:
    known: Principal | None = conn.scope.get(PRINCIPAL)
    if known is not None:
        return known
    token = bearer(conn.headers)
    if token is None:
        raise Unauthenticated("missing API key: send 'Authorization: Bearer <key>'")
    return await get_weaver(conn).auth.authenticate(token)


async def _caller(request: Request) -> Principal:
    return await principal_of(request)


async def admin_of(conn: HTTPConnection) -> Principal:
    """The caller, who must hold an admin key."""
    return await _admin(await principal_of(conn))


async def _admin(principal: Annotated[Principal, Depends(_caller)]) -> Principal:
    if not principal.admin:
        raise Forbidden("this action needs an admin key")
    return principal


Caller = Annotated[Principal, Depends(_caller)]
Admin = Annotated[Principal, Depends(_admin)]
