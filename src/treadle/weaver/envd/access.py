"""Who an envd request is for, and whether it may be: the sandbox it names (the
`E2b-Sandbox-Id` header, or the host name its router read it from), checked against the
sandbox's access token (`X-Access-Token`, which the E2B surface hands out with every sandbox
it creates or connects to), and the user inside the sandbox it acts as (`Authorization: Basic
base64("<user>:")`, else the sandbox's own user).

envd requests carry no API key: the access token is their credential, scoped to one sandbox
and so to its tenant. A request without it, or with another sandbox's, is refused the same
way whether or not the sandbox exists.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from treadle.domain.errors import NotFound
from treadle.protocol.messages import USER_PATTERN
from treadle.weaver.api.e2b.views import treadle_id
from treadle.weaver.core import Weaver
from treadle.weaver.services import port_access

__all__ = [
    "ENVD_PORT",
    "SANDBOX_HEADER",
    "TOKEN_HEADER",
    "Denied",
    "EnvdCaller",
    "authorize",
    "sandbox_user",
]

SANDBOX_HEADER = "e2b-sandbox-id"
TOKEN_HEADER = "x-access-token"
# The port envd listens on inside an E2B sandbox: what the SDK names in its headers and host
# names, answered here by Weaver itself.
ENVD_PORT = 49983
# The E2B name of a sandbox's default user: ours is whoever the sandbox runs as.
_DEFAULT_USER = "user"


class Denied(Exception):
    """Refused: `status` 401 (no or a wrong token), 400 (a malformed user)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class EnvdCaller:
    row: Any  # the sandbox's row
    user: str | None  # None: the sandbox's own user

    @property
    def sandbox_id(self) -> str:
        return str(self.row.id)

    @property
    def tenant_id(self) -> str:
        return str(self.row.tenant_id)


def sandbox_user(name: str | None) -> str | None:
    """A user as the sandbox's agent takes it: E2B's default user is the sandbox's own."""
    if not name or name == _DEFAULT_USER:
        return None
    if not re.fullmatch(USER_PATTERN, name):
        raise Denied(400, f"invalid user {name!r}")
    return name


async def authorize(
    weaver: Weaver, headers: Mapping[str, str], user: str | None = None
) -> EnvdCaller:
    """The caller, or `Denied`. `user`: a user named elsewhere than in the headers (the
    `/files` routes' `username`)."""
    sandbox_id = headers.get(SANDBOX_HEADER, "")
    token = headers.get(TOKEN_HEADER)
    if not sandbox_id or len(sandbox_id) > 64 or token is None:
        raise Denied(401, "an envd request needs E2b-Sandbox-Id and the sandbox's X-Access-Token")
    try:
        row = await weaver.sandboxes.get(None, treadle_id(sandbox_id))
    except NotFound:
        row = None
    if row is None or not port_access.valid_token(row.access_token, token):
        raise Denied(401, "the access token does not open this sandbox")
    return EnvdCaller(row, sandbox_user(user if user is not None else basic_user(headers)))


def basic_user(headers: Mapping[str, str]) -> str | None:
    """The user of `Authorization: Basic base64("<user>:")`, if given."""
    raw = headers.get("authorization", "")
    scheme, _, value = raw.partition(" ")
    if scheme.lower() != "basic" or not value:
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        raise Denied(400, "the Authorization header is not Basic base64(user:)") from None
    return decoded.partition(":")[0] or None
