"""Guard request bodies before they are read (pure ASGI: no per-request task overhead):
refuse oversized ones, and read every body as JSON, the only format the API takes, so a
client that forgot the Content-Type header gets its request handled rather than a puzzle."""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Receive, Scope, Send

from treadle.weaver.api.errors import error_body

__all__ = ["BodyLimit"]


class BodyLimit:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = [(n, v) for n, v in scope["headers"] if n != b"content-type"]
            headers.append((b"content-type", b"application/json"))
            scope = dict(scope, headers=headers)
            for name, value in scope["headers"]:
                if name == b"content-length":
                    try:
                        size = int(value)
                    except ValueError:
                        size = -1
                    if size > self.max_bytes or size < 0:
                        await self._refuse(send, size)
                        return
        await self.app(scope, receive, send)

    async def _refuse(self, send: Send, size: int) -> None:
        if size < 0:
            status, body = 400, error_body("invalid_request", "Content-Length is not a number")
        else:
            status, body = (
                413,
                error_body(
                    "payload_too_large",
                    f"request body is {size} bytes; the limit is {self.max_bytes}",
                    {"limit": self.max_bytes},
                ),
            )
        payload = json.dumps(body).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(payload)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": payload})
