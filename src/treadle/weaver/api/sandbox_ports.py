"""/v1/sandboxes/{id}/ports/{port}/…: HTTP and WebSocket servers inside sandboxes, reached
through Weaver.

Each request (or WebSocket) is one TCP connection that the sandbox's guest agent opens to
the port on the sandbox's own loopback, from inside its network namespace; its bytes travel
client → Weaver → the node's agent link → Shuttle → the agent, so a node behind NAT serves
them too, and the server needs no network of its own. Weaver speaks HTTP/1.1 to the server
(h11, one request per connection) and WebSocket (the `websockets` protocol machine) over that
stream.

Access: the tenant's API key (`Authorization: Bearer`), the sandbox's access token
(`X-Treadle-Access-Token`, or `treadle_token=` in the query), or a signed URL that has not
expired (`treadle_expires=` and `treadle_signature=`; see `services.port_access`). A signed
URL also sets a cookie for its port's path, so the pages it opens can load what they link
to. None of these reach the server: Weaver's own credentials are taken off the request.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

import h11
from fastapi import APIRouter, Path, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import MutableHeaders, QueryParams
from starlette.requests import HTTPConnection
from websockets.client import ClientProtocol
from websockets.exceptions import InvalidState
from websockets.frames import Frame, Opcode
from websockets.http11 import Response as WSResponse
from websockets.uri import parse_uri

from treadle.domain.desktop import DESKTOP_PORTS
from treadle.domain.errors import BadGateway, Forbidden, TreadleError, Unauthenticated
from treadle.protocol import PortStart
from treadle.weaver.api.deps import WeaverDep, bearer, get_weaver
from treadle.weaver.api.host_routing import HOST_ROUTED, host_for
from treadle.weaver.api.port_auth import (
    COOKIE,
    PORT_ACCESS,
    QUERY_KEYS,
    TOKEN_HEADER,
    authorize_port,
    port_prefix,
)
from treadle.weaver.api.relays import until_either
from treadle.weaver.api.sandboxes import running_node
from treadle.weaver.services import port_access
from treadle.weaver.services.streams import ExecStream

__all__ = ["router"]

router = APIRouter(prefix="/v1/sandboxes", tags=["sandbox ports"])
Port = Annotated[int, Path(ge=1, le=65535)]

# Headers that belong to one hop (RFC 9110 §7.6.1), or carry Weaver's own credentials.
_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "authorization",
    TOKEN_HEADER,
    "cookie",
    "content-length",
}
_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


def _target(path: str, query: QueryParams) -> str:
    kept = [(k, v) for k, v in query.multi_items() if k not in QUERY_KEYS]
    encoded = "&".join(f"{_quote(k)}={_quote(v)}" for k, v in kept)
    return "/" + path + ("?" + encoded if encoded else "")


def _quote(text: str) -> str:
    from urllib.parse import quote

    return quote(text, safe="")


def _upstream_headers(conn: HTTPConnection, sandbox_id: str, port: int) -> list[tuple[str, str]]:
    headers = [(k, v) for k, v in conn.headers.items() if k.lower() not in _HOP]
    if not any(k.lower() == "host" for k, _ in headers):
        headers.append(("host", f"localhost:{port}"))
    client = conn.client.host if conn.client else ""
    headers += [
        ("x-forwarded-for", client),
        ("x-forwarded-proto", conn.url.scheme.replace("ws", "http")),
    ]
    if not conn.scope.get(HOST_ROUTED):
        headers.append(("x-forwarded-prefix", port_prefix(sandbox_id, port)))
    return headers


async def _connect(conn: HTTPConnection, sandbox_id: str, port: int) -> tuple[ExecStream, Any]:
    row, cookie = conn.scope.get(PORT_ACCESS) or await authorize_port(conn, sandbox_id, port)
    _not_the_desktop_s(row, port)
    weaver = get_weaver(conn)
    row, session = await running_node(weaver, row.tenant_id, sandbox_id)
    stream = weaver.streams.start(
        session, row.tenant_id, PortStart, row.id, row.incarnation, port=port
    )
    return stream, cookie


def _not_the_desktop_s(row: Any, port: int) -> None:
    if port in DESKTOP_PORTS and row.spec.get("desktop"):
        raise Forbidden(
            f"port {port} of a desktop sandbox is its desktop's: use its /desktop routes",
            details={"port": port},
        )


def _refused(stream: ExecStream, port: int) -> BadGateway:
    ended = stream.ended
    if ended is not None and ended.error_code == "ECONNREFUSED":
        return BadGateway(f"nothing listens on port {port} in the sandbox", details={"port": port})
    why = ended.error if ended is not None and ended.error else "it closed the connection"
    return BadGateway(
        f"port {port} in the sandbox gave no HTTP answer: {why}", details={"port": port}
    )


# HTTP


@router.api_route(
    "/{sandbox_id}/ports/{port}/{path:path}", methods=_METHODS, summary="A sandbox's port"
)
async def proxy(sandbox_id: str, port: Port, path: str, request: Request) -> Any:
    stream, cookie = await _connect(request, sandbox_id, port)
    output = stream.output().__aiter__()
    client = h11.Connection(h11.CLIENT)
    try:
        headers = _upstream_headers(request, sandbox_id, port)
        framing = request.headers.get("content-length")
        if framing is not None:
            headers.append(("content-length", framing))
        elif "chunked" in request.headers.get("transfer-encoding", ""):
            headers.append(("transfer-encoding", "chunked"))
        headers.append(("connection", "close"))
        target = _target(path, request.query_params)
        stream.write(
            client.send(h11.Request(method=request.method, target=target, headers=headers))
        )
        async for chunk in request.stream():
            if chunk:
                stream.write(client.send(h11.Data(data=chunk)))
                await stream.drain()
        stream.write(client.send(h11.EndOfMessage()) or b"")
        head = await _next_event(client, output, stream, port)
        while isinstance(head, h11.InformationalResponse):
            head = await _next_event(client, output, stream, port)
        if not isinstance(head, h11.Response):
            raise _refused(stream, port)
    except h11.ProtocolError as exc:
        stream.detach()
        raise BadGateway(
            f"port {port} in the sandbox did not answer in HTTP/1.1: {exc}", details={"port": port}
        ) from None
    except BaseException:
        stream.detach()
        raise
    response_headers = [
        (k.decode("latin-1"), v.decode("latin-1"))
        for k, v in head.headers
        if k.decode("latin-1").lower() not in _HOP - {"cookie"}
    ]
    if cookie is not None:
        # For the port's paths only: all of the host's, when it came by host name.
        scope = "/" if request.scope.get(HOST_ROUTED) else f"{port_prefix(sandbox_id, port)}/"
        response_headers.append(
            (
                "set-cookie",
                f"{COOKIE}_{sandbox_id}_{port}={cookie}; Path={scope}; HttpOnly; SameSite=Lax",
            )
        )
    return StreamingResponse(
        _body(client, output, stream, port),
        status_code=head.status_code,
        headers=_multi(response_headers),
    )


def _multi(headers: list[tuple[str, str]]) -> MutableHeaders:
    """Headers that may repeat (set-cookie), in the mapping Starlette takes."""
    out = MutableHeaders()
    for key, value in headers:
        out.append(key, value)
    return out


async def _body(
    client: h11.Connection, output: AsyncIterator[tuple[str, bytes]], stream: ExecStream, port: int
) -> AsyncIterator[bytes]:
    try:
        while True:
            event = await _next_event(client, output, stream, port)
            if isinstance(event, h11.Data):
                yield bytes(event.data)
            elif isinstance(event, h11.EndOfMessage) or event is None:
                return
    except h11.ProtocolError:
        return  # the head is sent: all that is left is to stop
    finally:
        if stream.ended is None:
            stream.detach()


async def _next_event(
    client: h11.Connection, output: AsyncIterator[tuple[str, bytes]], stream: ExecStream, port: int
) -> Any:
    """The server's next HTTP event; None when the connection ended without one."""
    while True:
        event = client.next_event()
        if event is not h11.NEED_DATA:
            return event
        try:
            _, data = await anext(output)
        except StopAsyncIteration:
            client.receive_data(b"")
            event = client.next_event()
            return None if event is h11.NEED_DATA else event
        client.receive_data(data)


# WebSocket


@router.websocket("/{sandbox_id}/ports/{port}/{path:path}")
async def proxy_websocket(websocket: WebSocket, sandbox_id: str, port: int, path: str) -> None:
    if not 1 <= port <= 65535:
        await websocket.close(code=4404)
        return
    try:
        stream, _ = await _connect(websocket, sandbox_id, port)
    except TreadleError as exc:
        await websocket.close(code=1008 if exc.code in ("unauthenticated", "forbidden") else 1011)
        return
    try:
        await _relay_websocket(websocket, stream, port, _target(path, websocket.query_params))
    finally:
        if stream.ended is None:
            stream.detach()


async def _relay_websocket(
    websocket: WebSocket, stream: ExecStream, port: int, target: str
) -> None:
    protocols = [
        p.strip()
        for p in websocket.headers.get("sec-websocket-protocol", "").split(",")
        if p.strip()
    ]
    server = ClientProtocol(
        parse_uri(f"ws://localhost:{port}{target}"),
        subprotocols=protocols or None,  # type: ignore[arg-type]
        max_size=None,
    )
    request = server.connect()
    for key, value in _upstream_headers(websocket, "", port):
        if key.lower() not in (
            "host",
            "sec-websocket-key",
            "sec-websocket-version",
            "sec-websocket-extensions",
            "sec-websocket-protocol",
        ):
            request.headers[key] = value
    server.send_request(request)
    _flush(server, stream)
    output = stream.output().__aiter__()
    # The server's handshake answer, before the client's is accepted.
    handshake: WSResponse | None = None
    pending: list[Frame] = []
    while handshake is None:
        try:
            _, data = await anext(output)
        except StopAsyncIteration:
            await websocket.close(code=1011, reason="the sandbox's port did not answer")
            return
        server.receive_data(data)
        for event in server.events_received():
            if isinstance(event, WSResponse):
                handshake = event
            elif isinstance(event, Frame):
                pending.append(event)
    if server.handshake_exc is not None or handshake.status_code != 101:
        await websocket.close(code=1011, reason="the sandbox's port refused the WebSocket")
        return
    await websocket.accept(subprotocol=handshake.headers.get("Sec-WebSocket-Protocol"))

    messages = _Messages(websocket)

    async def from_server() -> None:
        for frame in pending:
            await messages.frame(frame)
        async for _, data in output:
            server.receive_data(data)
            _flush(server, stream)
            for event in server.events_received():
                if isinstance(event, Frame):
                    if event.opcode is Opcode.CLOSE:
                        return
                    await messages.frame(event)

    async def from_client() -> None:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            try:
                if message.get("text") is not None:
                    server.send_text(message["text"].encode())
                elif message.get("bytes") is not None:
                    server.send_binary(message["bytes"])
            except InvalidState:
                return
            _flush(server, stream)
            await stream.drain()

    await until_either(from_server(), from_client())
    with_close = server.close_rcvd
    with contextlib.suppress(RuntimeError, WebSocketDisconnect):
        await websocket.close(code=with_close.code if with_close is not None else 1000)


class _Messages:
    """The server's frames joined into messages (the protocol machine hands frames; the
    client gets whole messages), sent to the client."""

    def __init__(self, websocket: WebSocket) -> None:
        self._websocket = websocket
        self._opcode: Opcode | None = None
        self._data = bytearray()

    async def frame(self, frame: Frame) -> None:
        if frame.opcode in (Opcode.TEXT, Opcode.BINARY):
            self._opcode, self._data = frame.opcode, bytearray(frame.data)
        elif frame.opcode is Opcode.CONT and self._opcode is not None:
            self._data.extend(frame.data)
        else:
            return  # ping, pong: the protocol machine answers them
        if not frame.fin:
            return
        opcode, data = self._opcode, bytes(self._data)
        self._opcode, self._data = None, bytearray()
        if opcode is Opcode.TEXT:
            await self._websocket.send_text(data.decode("utf-8", errors="replace"))
        else:
            await self._websocket.send_bytes(data)


def _flush(server: ClientProtocol, stream: ExecStream) -> None:
    for data in server.data_to_send():
        if data:
            stream.write(data)
        else:
            stream.write(b"", eof=True)


# signed URLs


class UrlBody(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    port: int = Field(ge=1, le=65535)
    path: str = Field(default="/", max_length=4096, pattern=r"^/")
    expires_in_s: float = Field(default=3600.0, gt=0, le=port_access.MAX_EXPIRY_S)


@router.post("/{sandbox_id}/urls", summary="A signed URL to a sandbox's port")
async def signed_url(sandbox_id: str, body: UrlBody, request: Request, weaver: WeaverDep) -> Any:
    """A URL that opens the port without any header until it expires (a browser can
    follow it). Not under `/ports/`, where every path is the sandbox server's."""
    port = body.port
    key = bearer(request.headers)
    if key is None:
        raise Unauthenticated("missing API key: send 'Authorization: Bearer <key>'")
    principal = await weaver.auth.authenticate(key)
    row = await weaver.sandboxes.get(principal.tenant_id, sandbox_id)
    _not_the_desktop_s(row, port)
    expires = int(time.time() + body.expires_in_s)
    signature = port_access.sign(row.access_token or "", sandbox_id, port, expires)
    base = str(request.base_url).rstrip("/")
    path, _, query = body.path.partition("?")
    query = (
        query + "&" if query else ""
    ) + f"treadle_expires={expires}&treadle_signature={signature}"
    answer = {
        "url": f"{base}{port_prefix(sandbox_id, port)}{path}?{query}",
        "expires_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(expires)),
    }
    domain = weaver.settings.sandbox_domain
    if domain:
        # The same, by host name: the app then sees its own paths from `/`.
        at = request.base_url
        host = host_for(domain, sandbox_id, port) + (f":{at.port}" if at.port else "")
        answer["host_url"] = f"{at.scheme}://{host}{path}?{query}"
    return answer
