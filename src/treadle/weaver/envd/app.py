"""envd on Weaver's own port: a request that names a sandbox (`E2b-Sandbox-Id`, as the e2b SDK
sends with `E2B_SANDBOX_URL` set) for one of envd's paths is served here, not by the API.

- `/process.Process/*` and `/filesystem.Filesystem/*`: Connect-RPC (unary and streaming,
  JSON or binary protobuf), by connectrpc's ASGI applications over the generated stubs;
- `/files`: plain HTTP downloads and uploads (`files`).

The host name `49983-{id}.{domain}` (with `sandbox_domain` set) names the sandbox as the header
does. Every other request goes on to the API unchanged (`GET /health` too: the E2B routes
answer it, header or not).
"""

from __future__ import annotations

import re

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from treadle.weaver.core import Weaver
from treadle.weaver.envd.access import ENVD_PORT, SANDBOX_HEADER
from treadle.weaver.envd.files import files
from treadle.weaver.envd.filesystem import FilesystemService
from treadle.weaver.envd.gen.filesystem.filesystem_connect import FilesystemASGIApplication
from treadle.weaver.envd.gen.process.process_connect import ProcessASGIApplication
from treadle.weaver.envd.process import ProcessService

__all__ = ["EnvdRouting"]

# Connect messages past this are refused (stdin and file content go in pieces far smaller).
_READ_MAX_BYTES = 16 * 1024 * 1024
_HEADER = SANDBOX_HEADER.encode()


class EnvdRouting:
    def __init__(self, app: ASGIApp, weaver: Weaver) -> None:
        self.app = app
        self._weaver = weaver
        self._process = ProcessASGIApplication(
            ProcessService(weaver), read_max_bytes=_READ_MAX_BYTES
        )
        self._filesystem = FilesystemASGIApplication(
            FilesystemService(weaver), read_max_bytes=_READ_MAX_BYTES
        )
        domain = weaver.settings.sandbox_domain
        self._host = (
            None
            if domain is None
            else re.compile(
                rf"^{ENVD_PORT}-([a-z0-9]{{1,60}})\.{re.escape(domain)}(?::[0-9]{{1,5}})?$"
            )
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            if self._host is not None:
                scope = self._by_host_name(scope)
            if any(k == _HEADER for k, _ in scope["headers"]):
                path: str = scope["path"]
                if path.startswith("/process.Process/"):
                    await self._process(scope, receive, send)
                    return
                if path.startswith("/filesystem.Filesystem/"):
                    await self._filesystem(scope, receive, send)
                    return
                if path == "/files":
                    response = await files(self._weaver, Request(scope, receive))
                    await response(scope, receive, send)
                    return
        await self.app(scope, receive, send)

    def _by_host_name(self, scope: Scope) -> Scope:
        """`49983-{id}.{domain}`, where the SDK sends envd's calls when not told
        E2B_SANDBOX_URL, is that sandbox's envd: as if it had named it by header (and never
        its port 49983, which host routing would take it for)."""
        assert self._host is not None
        host = next((v for k, v in scope["headers"] if k == b"host"), b"")
        routed = self._host.match(host.decode("latin-1").lower())
        if routed is None:
            return scope
        headers = [(k, v) for k, v in scope["headers"] if k not in (b"host", _HEADER)]
        headers += [(b"host", b"envd"), (_HEADER, routed.group(1).encode())]
        return dict(scope, headers=headers)
