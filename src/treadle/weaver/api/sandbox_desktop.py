"""/v1/sandboxes/{id}/desktop/…: the screen of a desktop sandbox (DESIGN §12).

ctrl: screenshots and input, as a REST call (`actions`, `screenshot`) or over a WebSocket
session that keeps one connection to the sidecar. Each call's actions are checked here
(`treadle.domain.desktop`), then sent, through the node's link, to the ctrl sidecar inside
the sandbox, which runs them in order against the sandbox's X server and answers with one
screenshot. What ctrl answers is the tenant's: its size is bounded and its image passed on
as bytes, never decoded here.

stream: the sandbox's VNC server, bridged to a WebSocket (`vnc`), and a viewer page (`view`)
that opens it with noVNC. Weaver reads the viewer's side of that stream only, to drop a
view-only viewer's input (`treadle.protocol.rfb`); the server's side is passed on as it is.

Access: the tenant's API key or the sandbox's access token open all of it; a viewer URL
(`viewer`) signed with the access token opens the viewer page and its stream (view-only,
or with control when asked for), and nothing else.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import html
import json
import logging
import struct
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import HTMLResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import HTTPConnection

from treadle.domain.desktop import (
    CTRL_PORT,
    VNC_PORT,
    ActionsRequest,
    DesktopSpec,
    Screenshot,
    canonical,
)
from treadle.domain.errors import (
    BadGateway,
    Conflict,
    Forbidden,
    InvalidRequest,
    TreadleError,
    Unauthenticated,
    Unavailable,
)
from treadle.protocol import PortStart
from treadle.protocol.rfb import MAX_MESSAGE, ClientFilter
from treadle.weaver.api.deps import bearer, get_weaver
from treadle.weaver.api.errors import error_body
from treadle.weaver.api.port_auth import SANDBOX_ACCESS, authorize_sandbox
from treadle.weaver.api.relays import until_either
from treadle.weaver.api.sandboxes import running_node
from treadle.weaver.core import Weaver
from treadle.weaver.services import port_access
from treadle.weaver.services.streams import ExecStream

__all__ = ["NOVNC_PATH", "router"]

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/sandboxes", tags=["sandbox desktop"])

# Where Weaver serves noVNC's files (`app`) for the viewer page: public, as any static file.
NOVNC_PATH = "/static/novnc"
# What ctrl may answer with: a header (and an image, `_image_bound`).
MAX_HEADER = 1 << 20
# How long one call may take: its waits (a minute at most) and the rest.
_CALL_TIMEOUT_S = 90.0
# What ctrl takes in one request (`treadle.guest.ctrl`), and how many calls a replica has
# open at once (each may hold a screen's image).
MAX_REQUEST = 1 << 20
_MAX_CALLS = 8
# Viewers of one sandbox at once, on one replica.
MAX_VIEWERS = 8
# Signed viewer URLs: what they open.
_VIEW, _CONTROL = "desktop-view", "desktop-control"
_MEDIA = {"png": "image/png", "jpeg": "image/jpeg"}


async def _sandbox(conn: HTTPConnection, sandbox_id: str) -> Any:
    """The sandbox, if the caller holds the tenant's API key or the sandbox's token."""
    return conn.scope.get(SANDBOX_ACCESS) or await authorize_sandbox(conn, sandbox_id)


async def _row(weaver: Weaver, sandbox_id: str) -> Any:
    try:
        return await weaver.sandboxes.get(None, sandbox_id)
    except TreadleError:
        # Whether a sandbox exists is not told to who holds no credential of it.
        raise Forbidden("the access token or signed URL does not open this sandbox") from None


def _desktop(row: Any) -> DesktopSpec:
    found = row.spec.get("desktop")
    if not found:
        raise Conflict(
            f"sandbox {row.id} has no desktop: create it with `desktop` (or its template)",
            details={"id": row.id},
        )
    return DesktopSpec.model_validate(found)


class CtrlSession:
    """One connection to a sandbox's ctrl sidecar, through its node's link: calls, one at a
    time (`call`), then `close`."""

    def __init__(self, stream: ExecStream) -> None:
        self.stream = stream
        self._output: AsyncIterator[tuple[str, bytes]] = stream.output().__aiter__()
        self._buffer = bytearray()
        self._lock = asyncio.Lock()

    @classmethod
    async def open(cls, weaver: Weaver, row: Any) -> CtrlSession:
        row, session = await running_node(weaver, row.tenant_id, row.id)
        stream = weaver.streams.start(
            session, row.tenant_id, PortStart, row.id, row.incarnation, port=CTRL_PORT
        )
        return cls(stream)

    async def call(
        self, steps: list[dict[str, Any]], shot: Screenshot | None, desktop: DesktopSpec
    ) -> tuple[dict[str, Any], bytes]:
        request = {"actions": steps, "screenshot": shot.model_dump() if shot else None}
        body = json.dumps(request).encode()
        if len(body) > MAX_REQUEST:
            raise InvalidRequest(
                f"these actions are {len(body)} bytes for ctrl, more than the {MAX_REQUEST} "
                "it takes at once: send them in more than one batch",
                details=[{"loc": ["body", "actions"], "msg": "too much at once"}],
            )
        most = _image_bound(shot, desktop)
        async with self._lock:
            try:
                async with asyncio.timeout(_CALL_TIMEOUT_S):
                    self.stream.write(struct.pack(">I", len(body)) + body)
                    await self.stream.drain()
                    head = await self._read(8)
                    header_len, payload_len = struct.unpack(">II", head)
                    if header_len > MAX_HEADER or payload_len > most:
                        raise BadGateway("the sandbox's ctrl answered with more than it may")
                    said = await self._read(header_len)
                    payload = await self._read(payload_len)
            except TimeoutError:
                raise BadGateway(
                    f"the sandbox's ctrl did not answer within {_CALL_TIMEOUT_S:.0f} s"
                ) from None
        try:
            header = json.loads(said, parse_constant=_no_constant)
        except (ValueError, RecursionError):
            header = None
        if not isinstance(header, dict):
            raise BadGateway("the sandbox's ctrl answered with something else than a JSON object")
        if not header.get("ok"):
            index = header.get("index")
            loc: list[Any] = ["body", "actions"] + ([index] if isinstance(index, int) else [])
            message = str(header.get("error") or "refused")[:1000]
            raise InvalidRequest(f"the desktop refused it: {message}", details=[{"loc": loc}])
        return header, payload

    async def _read(self, size: int) -> bytes:
        while len(self._buffer) < size:
            try:
                _, data = await anext(self._output)
            except StopAsyncIteration:
                raise self._gone() from None
            self._buffer += data
        out = bytes(self._buffer[:size])
        del self._buffer[:size]
        return out

    def _gone(self) -> TreadleError:
        ended = self.stream.ended
        if ended is not None and ended.error_code == "ECONNREFUSED":
            return Unavailable("the sandbox's desktop is not serving (it is starting, or ended)")
        return BadGateway("the sandbox's ctrl closed the connection")

    def close(self) -> None:
        if self.stream.ended is None:
            self.stream.write(b"", eof=True)
            self.stream.detach()


def _shot_view(header: dict[str, Any], payload: bytes, *, inline: bool) -> dict[str, Any] | None:
    """The screenshot part of an answer: what ctrl said of it, and its bytes (base64) when
    `inline`."""
    said = header.get("screenshot")
    if not isinstance(said, dict):
        return None
    view = {k: said.get(k) for k in ("format", "width", "height", "region", "unchanged")}
    view["media_type"] = _MEDIA.get(str(view["format"]), "application/octet-stream")
    if inline and payload:
        view["data"] = base64.b64encode(payload).decode()
    return view


def _answer(header: dict[str, Any], payload: bytes, *, inline: bool) -> dict[str, Any]:
    return {
        "results": header.get("results"),
        "cursor": header.get("cursor"),
        "screenshot": _shot_view(header, payload, inline=inline),
    }


async def _run(weaver: Weaver, row: Any, request: ActionsRequest) -> tuple[dict[str, Any], bytes]:
    desktop = _desktop(row)
    steps, shot = canonical(request, desktop.width, desktop.height)
    async with _calls(weaver):
        ctrl = await CtrlSession.open(weaver, row)
        try:
            return await ctrl.call(steps, shot, desktop)
        finally:
            ctrl.close()


def _image_bound(shot: Screenshot | None, desktop: DesktopSpec) -> int:
    """The most an image ctrl answers `shot` with may be: none without a screenshot, else
    the pixels asked for, 4 bytes each, and room for a format's own overhead."""
    if shot is None:
        return 0
    width, height = (
        (shot.region[2], shot.region[3]) if shot.region else (desktop.width, desktop.height)
    )
    return width * height * 4 + (1 << 20)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


@contextlib.asynccontextmanager
async def _calls(weaver: Weaver) -> AsyncIterator[None]:
    """One of the ctrl calls this replica has open at once (`_MAX_CALLS`): their images are
    held in memory, so their number is bounded; past it a call waits its turn."""
    gate: asyncio.Semaphore | None = getattr(weaver, "_desktop_calls", None)
    if gate is None:
        gate = asyncio.Semaphore(_MAX_CALLS)
        weaver._desktop_calls = gate  # type: ignore[attr-defined]
    async with gate:
        yield


@router.get("/{sandbox_id}/desktop", summary="A sandbox's display")
async def describe(sandbox_id: str, request: Request) -> Any:
    row = await _sandbox(request, sandbox_id)
    return {**_desktop(row).model_dump(), "ctrl_port": CTRL_PORT, "vnc_port": VNC_PORT}


@router.post("/{sandbox_id}/desktop/actions", summary="Act on a sandbox's screen")
async def actions(sandbox_id: str, body: ActionsRequest, request: Request) -> Any:
    """Run the actions in order, then answer with their results and one screenshot if
    asked (base64, in `screenshot.data`)."""
    row = await _sandbox(request, sandbox_id)
    header, payload = await _run(get_weaver(request), row, body)
    return _answer(header, payload, inline=True)


@router.get("/{sandbox_id}/desktop/screenshot", summary="A sandbox's screen, as an image")
async def screenshot(
    sandbox_id: str,
    request: Request,
    format: Annotated[str, Query(pattern="^(png|jpeg)$")] = "png",
    quality: Annotated[int, Query(ge=1, le=100)] = 80,
    x: Annotated[int | None, Query(ge=0)] = None,
    y: Annotated[int | None, Query(ge=0)] = None,
    width: Annotated[int | None, Query(ge=1)] = None,
    height: Annotated[int | None, Query(ge=1)] = None,
    scale: Annotated[float | None, Query(gt=0, le=1)] = None,
    cursor: bool = False,
) -> Response:
    """The image itself; `X-Treadle-Region` says which part of the screen it shows."""
    region = None
    given = [v for v in (x, y, width, height) if v is not None]
    if given:
        if len(given) != 4:
            raise InvalidRequest(
                "a region is x, y, width and height, all four",
                details=[{"loc": ["query", "x"], "msg": "give x, y, width and height"}],
            )
        region = (x, y, width, height)
    try:
        shot = Screenshot(format=format, quality=quality, region=region, scale=scale, cursor=cursor)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise InvalidRequest(
            first["msg"], details=[{"loc": ["query", *first["loc"]], "msg": first["msg"]}]
        ) from None
    row = await _sandbox(request, sandbox_id)
    header, payload = await _run(get_weaver(request), row, ActionsRequest(screenshot=shot))
    said = header.get("screenshot")
    region = said.get("region") if isinstance(said, dict) else None
    headers = {"X-Treadle-Region": json.dumps(region), "Cache-Control": "no-store"}
    return Response(payload, media_type=_MEDIA[format], headers=headers)


@router.websocket("/{sandbox_id}/desktop/session")
async def session(websocket: WebSocket, sandbox_id: str) -> None:
    """A low-latency session: each text message is an `actions` body; each answer is a text
    message (as `actions` answers, without the image) and, when there is an image, one
    binary message with it. One connection to ctrl is kept for the whole session, so
    `changed_only` screenshots compare with this session's last full one."""
    weaver = get_weaver(websocket)
    try:
        row = await _sandbox(websocket, sandbox_id)
        desktop = _desktop(row)
        ctrl = await CtrlSession.open(weaver, row)
    except TreadleError as exc:
        await websocket.close(code=1008 if exc.code in _REFUSED else 1011, reason=str(exc)[:120])
        return
    await websocket.accept()
    try:
        while True:
            text = await websocket.receive_text()
            try:
                body = ActionsRequest.model_validate_json(text)
                steps, shot = canonical(body, desktop.width, desktop.height)
                async with _calls(weaver):
                    header, payload = await ctrl.call(steps, shot, desktop)
            except ValidationError as exc:
                first = exc.errors()[0]
                loc = ["body", *first["loc"]]
                await websocket.send_json(
                    error_body("invalid_request", first["msg"], [{"loc": loc, "msg": first["msg"]}])
                )
                continue
            except InvalidRequest as exc:
                await websocket.send_json(error_body(exc.code, exc.message, exc.details))
                continue
            await websocket.send_json(_answer(header, payload, inline=False))
            if payload:
                await websocket.send_bytes(payload)
    except (WebSocketDisconnect, RuntimeError):
        pass
    except TreadleError as exc:  # the connection to ctrl is gone, or ctrl is not ctrl
        with contextlib.suppress(RuntimeError, WebSocketDisconnect):
            await websocket.close(code=1011, reason=str(exc)[:120])
    except Exception:
        log.exception("desktop session of %s failed", sandbox_id)
        with contextlib.suppress(RuntimeError, WebSocketDisconnect):
            await websocket.close(code=1011, reason="internal error")
    finally:
        ctrl.close()


_REFUSED = ("unauthenticated", "forbidden", "not_found", "conflict")


# stream


class ViewerBody(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    view_only: bool = True
    expires_in_s: float = Field(default=3600.0, gt=0, le=port_access.MAX_EXPIRY_S)


@router.post("/{sandbox_id}/desktop/viewer", summary="A viewer URL for a person to open")
async def viewer(sandbox_id: str, body: ViewerBody, request: Request) -> Any:
    """A URL of the viewer page, signed with the sandbox's access token: it opens the live
    screen in a browser, view-only unless asked otherwise, until it expires."""
    key = bearer(request.headers)
    if key is None:
        raise Unauthenticated("missing API key: send 'Authorization: Bearer <key>'")
    weaver = get_weaver(request)
    principal = await weaver.auth.authenticate(key)
    row = await weaver.sandboxes.get(principal.tenant_id, sandbox_id)
    _desktop(row)
    if not row.access_token:
        raise Conflict(
            f"sandbox {sandbox_id} has no access token to sign a viewer URL with",
            details={"id": sandbox_id},
        )
    expires = int(time.time() + body.expires_in_s)
    scope = _VIEW if body.view_only else _CONTROL
    signature = port_access.sign(row.access_token, sandbox_id, scope, expires)
    query = f"view_only={int(body.view_only)}&treadle_expires={expires}"
    query += f"&treadle_signature={signature}"
    base = str(request.base_url).rstrip("/")
    return {
        "url": f"{base}/v1/sandboxes/{sandbox_id}/desktop/view?{query}",
        "view_only": body.view_only,
        "expires_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(expires)),
    }


async def _viewer_access(conn: HTTPConnection, sandbox_id: str) -> tuple[Any, bool, float | None]:
    """The sandbox, whether its viewer may only watch, and when its access ends: a signed
    viewer URL (view-only unless signed for control) at its expiry, else the API key or
    access token (control unless `view_only=1`), never."""
    asked_view_only = conn.query_params.get("view_only", "1") != "0"
    expires = conn.query_params.get("treadle_expires")
    signature = conn.query_params.get("treadle_signature")
    if signature is None:
        row = await _sandbox(conn, sandbox_id)
        return row, asked_view_only, None
    row = await _row(get_weaver(conn), sandbox_id)
    now = time.time()
    for scope, view_only in ((_CONTROL, asked_view_only), (_VIEW, True)):
        if port_access.valid_signature(
            row.access_token, sandbox_id, scope, expires, signature, now
        ):
            return row, view_only, float(expires or 0)
    raise Forbidden("the viewer URL does not open this sandbox (or has expired)")


@router.get("/{sandbox_id}/desktop/view", response_class=HTMLResponse, summary="A viewer page")
async def view(sandbox_id: str, request: Request) -> HTMLResponse:
    row, view_only, _ = await _viewer_access(request, sandbox_id)
    _desktop(row)
    page = _PAGE.replace("{{title}}", html.escape(f"treadle · {sandbox_id}"))
    page = page.replace("{{novnc}}", NOVNC_PATH)
    page = page.replace("{{vnc}}", json.dumps(f"/v1/sandboxes/{sandbox_id}/desktop/vnc"))
    page = page.replace("{{view_only}}", "true" if view_only else "false")
    headers = {"Cache-Control": "no-store", "Referrer-Policy": "no-referrer"}
    return HTMLResponse(page, headers=headers)


@router.websocket("/{sandbox_id}/desktop/vnc")
async def vnc(websocket: WebSocket, sandbox_id: str) -> None:
    """The sandbox's VNC server, over a WebSocket (binary messages), as noVNC speaks it."""
    weaver = get_weaver(websocket)
    viewers: dict[str, int] = weaver.__dict__.setdefault("_desktop_viewers", {})
    try:
        row, view_only, until = await _viewer_access(websocket, sandbox_id)
        _desktop(row)
        if viewers.get(row.id, 0) >= MAX_VIEWERS:
            # A URL handed around opens this many at most, and not the tenant's every stream.
            await websocket.close(code=1013, reason=f"{MAX_VIEWERS} viewers watch it already")
            return
        row, node = await running_node(weaver, row.tenant_id, sandbox_id)
        stream = weaver.streams.start(
            node, row.tenant_id, PortStart, row.id, row.incarnation, port=VNC_PORT
        )
    except TreadleError as exc:
        await websocket.close(code=1008 if exc.code in _REFUSED else 1011, reason=str(exc)[:120])
        return
    viewers[row.id] = viewers.get(row.id, 0) + 1
    try:
        await _relay_vnc(websocket, stream, view_only, until)
    finally:
        viewers[row.id] -= 1
        if not viewers[row.id]:
            del viewers[row.id]


async def _relay_vnc(
    websocket: WebSocket, stream: ExecStream, view_only: bool, until: float | None
) -> None:
    offered = [p.strip() for p in websocket.headers.get("sec-websocket-protocol", "").split(",")]
    await websocket.accept(subprotocol="binary" if "binary" in offered else None)
    screen = ClientFilter(view_only=view_only)

    async def from_server() -> None:
        async for _, data in stream.output():
            await websocket.send_bytes(data)

    async def from_viewer() -> None:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            data = message.get("bytes") or (message.get("text") or "").encode()
            if len(data) > MAX_MESSAGE:
                return  # more than a viewer ever sends at once
            try:
                passed = screen.feed(data)
            except ValueError:
                return  # not RFB as a viewer speaks it: the stream ends
            if passed:
                stream.write(passed)
                await stream.drain()

    async def expiry() -> None:
        # A signed URL's viewer watches until the URL expires, not for ever after.
        await asyncio.sleep(max(0.0, until - time.time()) if until else float("inf"))

    try:
        await until_either(from_server(), from_viewer(), expiry())
    finally:
        if stream.ended is None:
            stream.write(b"", eof=True)
            stream.detach()
        with contextlib.suppress(RuntimeError, WebSocketDisconnect):
            await websocket.close()


_PAGE = (Path(__file__).parent / "desktop_view.html").read_text()
