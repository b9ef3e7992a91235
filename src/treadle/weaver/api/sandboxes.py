"""/v1/sandboxes: create, read, list, stop, pause, resume, refresh the TTL, and exec."""

from __future__ import annotations

import base64
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Query, WebSocket, WebSocketDisconnect
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from treadle.domain.errors import InvalidRequest, TreadleError, Unavailable
from treadle.domain.sandbox import (
    MAX_CWD,
    MAX_TAG,
    MAX_TIMEOUT_S,
    Desired,
    SandboxSpec,
    SandboxStatus,
    check_argv,
    check_env,
)
from treadle.protocol.messages import USER_PATTERN
from treadle.weaver.api.deps import Caller, WeaverDep, get_weaver, principal_of
from treadle.weaver.api.errors import error_body
from treadle.weaver.api.relays import until_either
from treadle.weaver.api.sandbox_errors import sandbox_error
from treadle.weaver.core import Weaver
from treadle.weaver.services.nodes import NodeSession
from treadle.weaver.services.sandboxes import sandbox_view
from treadle.weaver.services.streams import Ended, ExecStream

__all__ = ["router", "running_node"]

router = APIRouter(prefix="/v1/sandboxes", tags=["sandboxes"])


@router.post("", status_code=201, summary="Create a sandbox")
async def create_sandbox(spec: SandboxSpec, caller: Caller, weaver: WeaverDep) -> Any:
    return sandbox_view(await weaver.sandboxes.create(caller.tenant_id, spec))


@router.get("", summary="List sandboxes, newest first")
async def list_sandboxes(
    caller: Caller,
    weaver: WeaverDep,
    status: Annotated[list[SandboxStatus] | None, Query()] = None,
    metadata: Annotated[list[str] | None, Query(description="key:value, repeatable")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    cursor: str | None = None,
) -> Any:
    wanted: dict[str, str] = {}
    for item in metadata or []:
        key, sep, value = item.partition(":")
        if not sep or not key:
            raise InvalidRequest(
                "metadata filters are key:value",
                details=[{"loc": ["query", "metadata"], "msg": f"not key:value: {item!r}"}],
            )
        wanted[key] = value
    items, next_cursor = await weaver.sandboxes.page(
        caller.tenant_id, statuses=status or (), metadata=wanted, limit=limit, cursor=cursor
    )
    return {"items": items, "next_cursor": next_cursor}


@router.get("/{sandbox_id}", summary="One sandbox")
async def get_sandbox(sandbox_id: str, caller: Caller, weaver: WeaverDep) -> Any:
    return sandbox_view(await weaver.sandboxes.get(caller.tenant_id, sandbox_id))


@router.delete("/{sandbox_id}", summary="Stop a sandbox and free all it holds")
async def delete_sandbox(sandbox_id: str, caller: Caller, weaver: WeaverDep) -> Any:
    row = await weaver.sandboxes.desire(caller.tenant_id, sandbox_id, Desired.STOPPED)
    return sandbox_view(row)


@router.post("/{sandbox_id}/pause", summary="Freeze every process of a sandbox in place")
async def pause_sandbox(sandbox_id: str, caller: Caller, weaver: WeaverDep) -> Any:
    row = await weaver.sandboxes.desire(caller.tenant_id, sandbox_id, Desired.PAUSED)
    return sandbox_view(row)


@router.post("/{sandbox_id}/resume", summary="Thaw a paused sandbox")
async def resume_sandbox(sandbox_id: str, caller: Caller, weaver: WeaverDep) -> Any:
    row = await weaver.sandboxes.desire(caller.tenant_id, sandbox_id, Desired.RUNNING)
    return sandbox_view(row)


class TimeoutBody(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    timeout_s: float = Field(gt=0, le=MAX_TIMEOUT_S)


@router.post("/{sandbox_id}/timeout", summary="End the sandbox's TTL this long from now")
async def set_timeout(sandbox_id: str, body: TimeoutBody, caller: Caller, weaver: WeaverDep) -> Any:
    row = await weaver.sandboxes.set_timeout(caller.tenant_id, sandbox_id, body.timeout_s)
    return sandbox_view(row)


class ExecBody(BaseModel):
    """A process to run in the sandbox, waited for: `cmd` is an argv, or a shell line run
    with `/bin/sh -c`."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    cmd: list[str] | str = Field(min_length=1)
    env: dict[str, str] = Field(default_factory=dict)
    cwd: str | None = Field(default=None, max_length=MAX_CWD)
    stdin: str | None = Field(default=None, max_length=16 * 1024 * 1024)
    timeout_s: float | None = Field(default=60.0, gt=0, le=7 * 24 * 3600)
    tag: str | None = Field(default=None, min_length=1, max_length=MAX_TAG)
    # A user of the sandbox's (name or uid); none: the sandbox's own user.
    user: str | None = Field(default=None, pattern=USER_PATTERN)

    @field_validator("cmd")
    @classmethod
    def _argv(cls, value: list[str] | str) -> list[str] | str:
        check_argv(["/bin/sh", "-c", value] if isinstance(value, str) else value)
        return value

    @field_validator("env")
    @classmethod
    def _env(cls, value: dict[str, str]) -> dict[str, str]:
        return check_env(value)

    @property
    def argv(self) -> list[str]:
        return ["/bin/sh", "-c", self.cmd] if isinstance(self.cmd, str) else list(self.cmd)


@router.post("/{sandbox_id}/exec", summary="Run a process in a sandbox and wait for it")
async def exec_in_sandbox(
    sandbox_id: str, body: ExecBody, caller: Caller, weaver: WeaverDep
) -> Any:
    stream = await _open(weaver, caller.tenant_id, sandbox_id, body, stdin=body.stdin is not None)
    if body.stdin is not None:
        stream.write(body.stdin.encode(), eof=True)
    cap = weaver.settings.max_output_bytes
    out = {"stdout": bytearray(), "stderr": bytearray()}
    truncated = False
    try:
        async for channel, data in stream.output():
            room = cap - len(out["stdout"]) - len(out["stderr"])
            if len(data) > room:
                truncated = True
                data = data[: max(room, 0)]
            out[channel].extend(data)
    finally:
        if stream.ended is None:
            stream.detach()  # the client went away: the process runs on, to its timeout
    ended = stream.ended
    assert ended is not None
    started = await stream.started()
    if started is None and ended.error_code is not None:
        # Refused before it started (a user the sandbox has not, say): the request's fault.
        raise sandbox_error(ended, {"id": sandbox_id, "user": body.user})
    return {
        "pid": None if started is None else started.pid,
        "tag": body.tag,
        "exit_code": ended.exit_code,
        "signal": ended.signal,
        "error": ended.error,
        "timed_out": ended.timed_out,
        "stdout": out["stdout"].decode(errors="replace"),
        "stderr": out["stderr"].decode(errors="replace"),
        "output_truncated": truncated,
    }


async def _open(
    weaver: Weaver,
    tenant_id: str,
    sandbox_id: str,
    body: ExecBody,
    *,
    stdin: bool,
    pty: tuple[int, int] | None = None,
) -> ExecStream:
    """Start `body`'s process in the running sandbox, on its node's link."""
    row, session = await running_node(weaver, tenant_id, sandbox_id)
    return weaver.streams.open(
        session,
        tenant_id,
        row.id,
        row.incarnation,
        body.argv,
        env=body.env,
        cwd=body.cwd,
        tag=body.tag,
        stdin=stdin,
        pty=pty,
        timeout_s=body.timeout_s,
        user=body.user,
    )


class _Start(ExecBody):
    """The first message on the exec WebSocket: unlike a waited-for exec, the process has
    no timeout unless one is given."""

    pty: dict[str, int] | None = None
    timeout_s: float | None = Field(default=None, gt=0, le=7 * 24 * 3600)

    @field_validator("pty")
    @classmethod
    def _size(cls, value: dict[str, int] | None) -> dict[str, int] | None:
        if value is not None and not (
            set(value) == {"rows", "cols"} and all(1 <= v <= 1000 for v in value.values())
        ):
            raise ValueError("pty is {rows, cols}, each 1-1000")
        return value


@router.websocket("/{sandbox_id}/exec")
async def exec_stream(websocket: WebSocket, sandbox_id: str) -> None:
    """Interactive exec. The client's first message is `{"cmd", "env", "cwd", "tag",
    "timeout_s", "user", "pty": {"rows", "cols"}?}`; then `{"stdin": base64, "eof"?: true}`,
    `{"eof": true}`, `{"signal": n}`, `{"resize": {"rows", "cols"}}` in any order. The server
    sends `{"started": {"pid", "tag"}}`, then `{"stdout"|"stderr": base64}` as the process
    writes, at the pace the client reads, and `{"exit": {...}}` last. Leaving does not kill
    the process: it runs on, and can be attached to again."""

    async def opening(tenant_id: str) -> ExecStream:
        weaver = get_weaver(websocket)
        try:
            start = _Start.model_validate(await websocket.receive_json())
        except (ValidationError, ValueError) as exc:
            raise InvalidRequest(f"the first message must start a process: {exc}") from None
        size = None if start.pty is None else (start.pty["rows"], start.pty["cols"])
        return await _open(weaver, tenant_id, sandbox_id, start, stdin=True, pty=size)

    await serve_stream(websocket, opening)


Relay = Callable[[WebSocket, ExecStream], Awaitable[None]]


async def serve_stream(
    websocket: WebSocket,
    opening: Callable[[str], Awaitable[ExecStream]],
    relay: Relay | None = None,
) -> None:
    """Authenticate, open the stream (`opening`, given the caller's tenant), and relay it
    (a process's both ways, unless `relay` says otherwise); errors (raised by either) are an
    error body and a 4xxx close code."""
    try:
        principal = await principal_of(websocket)
    except TreadleError:
        await websocket.close(code=1008)
        return
    await websocket.accept()
    stream: ExecStream | None = None
    try:
        stream = await opening(principal.tenant_id)
        await (relay or _relay)(websocket, stream)
    except TreadleError as exc:
        await websocket.send_json(error_body(exc.code, exc.message, exc.details))
        await websocket.close(code=4000 + (404 if exc.code == "not_found" else 400))
    except WebSocketDisconnect:
        pass
    finally:
        if stream is not None and stream.ended is None:
            stream.detach()


def exit_view(ended: Ended) -> dict[str, Any]:
    return {
        "exit_code": ended.exit_code,
        "signal": ended.signal,
        "error": ended.error,
        "timed_out": ended.timed_out,
    }


async def _relay(websocket: WebSocket, stream: ExecStream) -> None:
    started = await stream.started()
    if started is not None:
        await websocket.send_json({"started": {"pid": started.pid, "tag": started.tag}})

    async def outward() -> None:
        # Each send waits for the client: the window is granted as it takes the output.
        async for channel, data in stream.output():
            await websocket.send_json({channel: base64.b64encode(data).decode()})
        ended = stream.ended
        assert ended is not None
        await websocket.send_json({"exit": exit_view(ended)})
        await websocket.close(code=1000)

    async def inward() -> None:
        while True:
            message = await websocket.receive_json()
            if isinstance(message, dict):
                _from_client(stream, message)
                await stream.drain()  # the client's input, at the pace the process takes it

    await until_either(outward(), inward())


def _from_client(stream: ExecStream, message: dict[str, Any]) -> None:
    """One client message; what is not understood is ignored."""
    if isinstance(message.get("stdin"), str):
        try:
            data = base64.b64decode(message["stdin"], validate=True)
        except ValueError:
            return
        stream.write(data, eof=message.get("eof") is True)
    elif message.get("eof") is True:
        stream.write(b"", eof=True)
    elif isinstance(message.get("signal"), int) and 1 <= message["signal"] <= 64:
        stream.signal(message["signal"])
    elif isinstance(message.get("resize"), dict):
        rows, cols = message["resize"].get("rows"), message["resize"].get("cols")
        if (
            isinstance(rows, int)
            and isinstance(cols, int)
            and 1 <= rows <= 1000
            and 1 <= cols <= 1000
        ):
            stream.resize(rows, cols)


async def running_node(weaver: Weaver, tenant_id: str, sandbox_id: str) -> tuple[Any, NodeSession]:
    """The running sandbox and its node's link, which must be on this replica."""
    row = await _running(weaver, tenant_id, sandbox_id)
    session = weaver.registry.get(row.node_id)
    if session is None:
        raise Unavailable(
            "the sandbox's node is connected to another Weaver replica, or reconnecting; try again",
            details={"id": sandbox_id, "node_id": row.node_id},
        )
    return row, session


async def _running(weaver: Weaver, tenant_id: str, sandbox_id: str) -> Any:
    """The sandbox once it runs; 409 when it is not running (or not soon)."""
    return await weaver.sandboxes.running(await weaver.sandboxes.get(tenant_id, sandbox_id))
