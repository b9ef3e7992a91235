"""Who may reach a sandbox's port (`/v1/sandboxes/{id}/ports/{port}/…`), decided before
anything of the request's body is read: the tenant's API key, the sandbox's access token
(`X-Treadle-Access-Token`, `E2b-Traffic-Access-Token` or `treadle_token=`), a signed URL that
has not expired (`treadle_expires=` and `treadle_signature=`), or the cookie such a URL set for
its port; anyone at all where the sandbox was made with `public_ports`."""

from __future__ import annotations

import re
import time
from http.cookies import SimpleCookie
from typing import Any

from starlette.datastructures import Headers
from starlette.requests import HTTPConnection

from treadle.domain.errors import Forbidden, TreadleError, Unauthenticated
from treadle.domain.sandbox import Desired, SandboxStatus
from treadle.weaver.api.deps import bearer, get_weaver
from treadle.weaver.core import Weaver
from treadle.weaver.services import port_access

__all__ = [
    "COOKIE",
    "PORT_ACCESS",
    "PORT_PATH",
    "QUERY_KEYS",
    "SANDBOX_ACCESS",
    "TOKEN_HEADER",
    "authorize_port",
    "authorize_sandbox",
    "port_prefix",
]

TOKEN_HEADER = "x-treadle-access-token"
# The same token, as E2B's SDK and proxy name it (`trafficAccessToken`).
E2B_TOKEN_HEADER = "e2b-traffic-access-token"
QUERY_KEYS = ("treadle_token", "treadle_expires", "treadle_signature")
COOKIE = "treadle_port"
# Where the request guard leaves what `authorize_port` decided: (sandbox row, cookie to set).
PORT_ACCESS = "treadle.port_access"
# The sandbox a desktop route's caller may reach, once the guard has checked (`authorize_sandbox`).
SANDBOX_ACCESS = "treadle.sandbox_access"
PORT_PATH = re.compile(r"^/v1/sandboxes/([^/]{1,64})/ports/([0-9]{1,5})(?:/|$)")
_REFUSED = "the access token or signed URL does not open this port (or has expired)"
# Seconds since the epoch, as `port_access.valid_signature` reads them.
_EXPIRY_DIGITS = 12
_GONE = (SandboxStatus.STOPPING.value, SandboxStatus.STOPPED.value, SandboxStatus.FAILED.value)


def port_prefix(sandbox_id: str, port: int) -> str:
    return f"/v1/sandboxes/{sandbox_id}/ports/{port}"


async def authorize_port(
    conn: HTTPConnection, sandbox_id: str, port: int
) -> tuple[Any, str | None]:
    """The sandbox, if the caller may reach its port; and the cookie to set, for a caller
    that came by a signed URL. Raises Unauthenticated (no credential) or Forbidden."""
    weaver = get_weaver(conn)
    key = bearer(conn.headers)
    if key is not None:
        principal = await weaver.auth.authenticate(key)
        return await weaver.sandboxes.get(principal.tenant_id, sandbox_id), None
    query = conn.query_params
    token = (
        conn.headers.get(TOKEN_HEADER)
        or conn.headers.get(E2B_TOKEN_HEADER)
        or query.get("treadle_token")
    )
    expires, signature = _expiry(query.get("treadle_expires")), query.get("treadle_signature")
    cookie = _cookie(conn.headers, sandbox_id, port)
    if token is None and signature is None and cookie is None:
        public = await _public(weaver, sandbox_id)
        if public is not None:
            return public, None
        raise Unauthenticated(
            "this port needs an API key, the sandbox's access token, or a signed URL"
        )
    row = await _row(weaver, sandbox_id)
    now = time.time()
    if token is not None and port_access.valid_token(row.access_token, token):
        return row, None
    if port_access.valid_signature(row.access_token, sandbox_id, port, expires, signature, now):
        return row, f"{expires}.{signature}"
    if cookie is not None:
        expires, _, signature = cookie.partition(".")
        if port_access.valid_signature(
            row.access_token, sandbox_id, port, _expiry(expires), signature, now
        ):
            return row, None
    raise Forbidden(_REFUSED)


async def authorize_sandbox(conn: HTTPConnection, sandbox_id: str) -> Any:
    """The sandbox, if the caller holds the tenant's API key or the sandbox's access token
    (a desktop's routes: no signed URL, and public ports do not open them). Raises
    Unauthenticated (no credential) or Forbidden."""
    weaver = get_weaver(conn)
    key = bearer(conn.headers)
    if key is not None:
        principal = await weaver.auth.authenticate(key)
        return await weaver.sandboxes.get(principal.tenant_id, sandbox_id)
    token = conn.headers.get(TOKEN_HEADER) or conn.query_params.get("treadle_token")
    if token is None:
        raise Unauthenticated("send 'Authorization: Bearer <key>' or the sandbox's access token")
    row = await _row(weaver, sandbox_id)
    if not port_access.valid_token(row.access_token, token):
        raise Forbidden("the access token does not open this sandbox")
    return row


async def _public(weaver: Weaver, sandbox_id: str) -> Any:
    """The sandbox if its ports are open to all (`public_ports`) and it is not gone, else
    None: whether one that is not (or was) exists is not told."""
    try:
        row = await weaver.sandboxes.get(None, sandbox_id)
    except TreadleError:
        return None
    if row.desired == Desired.STOPPED.value or row.status in _GONE:
        return None
    return row if row.spec.get("public_ports") else None


def _expiry(value: str | None) -> str | None:
    """An expiry that can be one (ASCII digits, not too many to read), else None."""
    if value is None or len(value) > _EXPIRY_DIGITS or not value.isascii():
        return None
    return value if value.isdigit() else None


async def _row(weaver: Weaver, sandbox_id: str) -> Any:
    try:
        return await weaver.sandboxes.get(None, sandbox_id)
    except TreadleError:
        # Whether a sandbox exists is not told to whoever holds no credential of it.
        raise Forbidden(_REFUSED) from None


def _cookie(headers: Headers, sandbox_id: str, port: int) -> str | None:
    raw = headers.get("cookie")
    if not raw:
        return None
    jar: SimpleCookie = SimpleCookie()
    try:
        jar.load(raw)
    except Exception:
        return None
    morsel = jar.get(f"{COOKIE}_{sandbox_id}_{port}")
    return None if morsel is None else morsel.value
