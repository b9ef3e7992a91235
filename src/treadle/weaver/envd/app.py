"""envd on Weaver's own port: a request that names a sandbox (`E2b-Sandbox-Id`, as the e2b SDK
sends with `E2B_SANDBOX_URL` set) for one of envd's paths is served here, not by the API.

- `/process.Process/*` and `/filesystem.Filesystem/*`: Connect-RPC (unary and streaming,
  JSON or binary protobuf), by connectrpc's ASGI applications over the generated stubs;
- `/files`: plain HTTP downloads and uploads (`files`).

The host name `49983-{id}.{domain}` (with `sandbox_domain` set) names the sandbox as the header
does. Every other request goes on to the API unchanged (`GET /health` too: the E2B routes
answer it, header or not).

A Connect request's access token is checked before its body is read (a caller without it
makes Weaver read nothing), and a JSON message is checked for nesting before protobuf's
parser, which overflows its stack on arrays nested some thousands deep, reads it.
"""

from __future__ import annotations

import json
import re
from typing import Any

from connectrpc.code import Code
from connectrpc.codec import Codec, proto_binary_codec, proto_json_codec
from connectrpc.errors import ConnectError
from connectrpc.request import RequestContext
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from treadle.weaver.core import Weaver
from treadle.weaver.envd.access import ENVD_PORT, SANDBOX_HEADER
from treadle.weaver.envd.errors import caller_of
from treadle.weaver.envd.files import files
from treadle.weaver.envd.filesystem import FilesystemService
from treadle.weaver.envd.gen.filesystem.filesystem_connect import FilesystemASGIApplication
from treadle.weaver.envd.gen.process.process_connect import ProcessASGIApplication
from treadle.weaver.envd.process import ProcessService

__all__ = ["EnvdRouting"]

# Connect messages past this are refused (stdin and file content go in pieces far smaller).
_READ_MAX_BYTES = 16 * 1024 * 1024
_HEADER = SANDBOX_HEADER.encode()
# A JSON message with at most this many brackets cannot nest deeper than protobuf's parser
# takes; one with more is parsed by Python's first, which refuses deep nesting cleanly.
_FEW_BRACKETS = 256


class _ShallowJSON:
    """Connect's JSON codec, refusing (invalid_argument) a message nested deeper than Python's
    recursion limit, before protobuf's parser could crash the process on it."""

    def __init__(self) -> None:
        self._codec: Codec = proto_json_codec()

    def name(self) -> str:
        return self._codec.name()

    def encode(self, message: Any) -> bytes:
        return self._codec.encode(message)

    def decode(self, data: bytes | bytearray, message_class: type[Any]) -> Any:
        if data.count(b"[") + data.count(b"{") > _FEW_BRACKETS:
            try:
                json.loads(data)
            except RecursionError:
                raise ConnectError(
                    Code.INVALID_ARGUMENT, "the message is nested too deeply"
                ) from None
            except ValueError:
                pass  # not JSON: protobuf's parser says why
        return self._codec.decode(data, message_class)


class _Authenticated:
    """A metadata interceptor: the sandbox's access token is checked before the request's
    body is read (the services check it again, and find the caller)."""

    def __init__(self, weaver: Weaver) -> None:
        self._weaver = weaver

    async def on_start(self, ctx: RequestContext[Any, Any]) -> None:
        await caller_of(self._weaver, ctx.request_headers)

    async def on_end(self, token: None, ctx: RequestContext[Any, Any], error: Any, /) -> None:
        return None


class EnvdRouting:
    def __init__(self, app: ASGIApp, weaver: Weaver) -> None:
        self.app = app
        self._weaver = weaver
        options: dict[str, Any] = {
            "read_max_bytes": _READ_MAX_BYTES,
            "codecs": [proto_binary_codec(), _ShallowJSON()],
            "interceptors": [_Authenticated(weaver)],
        }
        self._process = ProcessASGIApplication(ProcessService(weaver), **options)
        self._filesystem = FilesystemASGIApplication(FilesystemService(weaver), **options)
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
