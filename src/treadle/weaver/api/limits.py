"""Guard requests before the application reads their bodies (pure ASGI: no per-request task
overhead).

- Every HTTP request under `/v1/` must carry a known API key, checked here before anything of
  its body is read: whoever merely reaches the port cannot make Weaver read, buffer or parse
  a body. (`/v1/agent` is a WebSocket, authenticated by its own handshake; `/healthz`,
  `/openapi.json` and the docs are outside `/v1/`.)
- A body is limited to `max_bytes` as it is read, whatever its framing (but a file written
  to a sandbox, which its disk bounds): a Content-Length
  above the limit is refused at once, and a body without one (chunked) is refused as soon as
  the bytes received pass the limit, before the application gets to parse it.
- Every body is read as JSON, the only format the API takes, so a client that forgot the
  Content-Type header gets its request handled rather than a puzzle.
- A sandbox's port (`/v1/sandboxes/{id}/ports/{port}/…`) opens with its own credentials too
  (`port_auth`), and its requests go to the sandbox's server as they came.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from typing import Any

from starlette.datastructures import Headers
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from treadle.domain.errors import TreadleError, Unauthenticated
from treadle.weaver.api.deps import PRINCIPAL, bearer
from treadle.weaver.api.e2b.errors import E2B_PATH
from treadle.weaver.api.errors import error_body, status_for
from treadle.weaver.api.port_auth import (
    PORT_ACCESS,
    PORT_PATH,
    SANDBOX_ACCESS,
    authorize_port,
    authorize_sandbox,
)

__all__ = ["RequestGuard"]

log = logging.getLogger(__name__)
_AUTHENTICATED_PREFIX = "/v1/"
_UNLIMITED = re.compile(r"^/v1/sandboxes/[^/]+/files/content$")
# A desktop's routes (`sandbox_desktop`): the sandbox's access token opens them too, checked
# here before a body is read; the viewer page checks its signed URL itself (it has no body).
_DESKTOP_PATH = re.compile(r"^/v1/sandboxes/([^/]{1,64})/desktop(/[a-z]+)?$")
_OWN_ACCESS = ("/view",)
_KEY_ONLY = ("/viewer",)


class _BodyTooLarge(Exception):
    """Raised from `receive` into the application once the body passes the limit."""


class RequestGuard:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        port = PORT_PATH.match(scope["path"])
        if port is None:
            headers = [(n, v) for n, v in scope["headers"] if n != b"content-type"]
            headers.append((b"content-type", b"application/json"))
            scope["headers"] = headers  # in place: what routing adds to it, all outer layers see
        desktop = _DESKTOP_PATH.match(scope["path"])
        if scope["path"].startswith(_AUTHENTICATED_PREFIX) and not (
            desktop is not None and desktop.group(2) in _OWN_ACCESS
        ):
            if port is not None:
                refusal = await _authorize_port(scope, port.group(1), int(port.group(2)))
            elif desktop is not None and desktop.group(2) not in _KEY_ONLY:
                refusal = await _authorize_sandbox(scope, desktop.group(1))
            else:
                refusal = await _authenticate(scope)
            if refusal is not None:
                await _respond(send, *refusal)
                return
        if _UNLIMITED.match(scope["path"]) and scope["method"] == "PUT":
            # A file's content: streamed to the sandbox at the pace it writes, bounded by
            # the sandbox's own disk (the route says so), not by the size of a request.
            await self.app(scope, receive, send)
            return
        length = Headers(scope=scope).get("content-length")
        if length is not None:
            try:
                size = int(length)
            except ValueError:
                size = -1
            if size < 0:
                await _respond(
                    send, 400, error_body("invalid_request", "Content-Length is not a number")
                )
                return
            if size > self.max_bytes:
                too_large = self._too_large(f"request body is {size} bytes", scope["path"])
                await _respond(send, *too_large)
                return
        await self._limited(scope, receive, send)

    async def _limited(self, scope: Scope, receive: Receive, send: Send) -> None:
        received = 0
        too_large = False
        responded = False

        async def counted() -> Message:
            nonlocal received, too_large
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    too_large = True
                    raise _BodyTooLarge
            return message

        async def guarded(message: Message) -> None:
            nonlocal responded
            # The application's answer to a body it could not finish reading is replaced.
            if too_large and not responded:
                return
            responded = True
            await send(message)

        try:
            await self.app(scope, counted, guarded)
        except Exception:
            if not too_large or responded:
                raise
        if too_large and not responded:
            await _respond(send, *self._too_large("request body is larger", scope["path"]))

    def _too_large(self, what: str, path: str) -> tuple[int, dict[str, Any]]:
        message = f"{what}; the limit is {self.max_bytes} bytes"
        if E2B_PATH.match(path):
            return 413, {"code": 413, "message": message}  # E2B's shape on E2B's routes
        return 413, error_body("payload_too_large", message, {"limit": self.max_bytes})


async def _authenticate(scope: Scope) -> tuple[int, dict[str, Any], Mapping[str, str]] | None:
    """None when the request carries a known API key (its principal then in the scope), else
    the refusal to send."""
    token = bearer(Headers(scope=scope))
    try:
        if token is None:
            raise Unauthenticated("missing API key: send 'Authorization: Bearer <key>'")
        scope[PRINCIPAL] = await scope["app"].state.weaver.auth.authenticate(token)
    except TreadleError as exc:
        body = error_body(exc.code, exc.message, exc.details)
        return status_for(exc), body, {"www-authenticate": "Bearer"}
    except Exception:
        # Outside the application its error handlers do not apply: answer as they would.
        log.exception("authenticating a request failed")
        return 500, error_body("internal", "internal error"), {}
    return None


async def _authorize_sandbox(
    scope: Scope, sandbox_id: str
) -> tuple[int, dict[str, Any], Mapping[str, str]] | None:
    """As `_authenticate`, for a sandbox's own routes that its access token opens too."""
    try:
        scope[SANDBOX_ACCESS] = await authorize_sandbox(HTTPConnection(scope), sandbox_id)
    except TreadleError as exc:
        body = error_body(exc.code, exc.message, exc.details)
        return status_for(exc), body, {"www-authenticate": "Bearer"}
    return None


async def _authorize_port(
    scope: Scope, sandbox_id: str, port: int
) -> tuple[int, dict[str, Any], Mapping[str, str]] | None:
    """As `_authenticate`, for a sandbox's port: its own credentials open it too."""
    try:
        scope[PORT_ACCESS] = await authorize_port(HTTPConnection(scope), sandbox_id, port)
    except TreadleError as exc:
        body = error_body(exc.code, exc.message, exc.details)
        return status_for(exc), body, {"www-authenticate": "Bearer"}
    return None


async def _respond(
    send: Send, status: int, body: dict[str, Any], headers: Mapping[str, str] | None = None
) -> None:
    payload = json.dumps(body).encode()
    raw_headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(payload)).encode()),
    ]
    raw_headers += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": payload})
