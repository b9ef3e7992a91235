"""/v1/sandboxes/{id}/files: read, write, list, stat, mkdir, move and remove, with paths as
the sandbox sees them (relative ones from its home). The guest agent does each inside the
boundary, as the sandbox's user (or the `user` named, where the sandbox has users): `..`,
absolute paths and symlinks resolve in the sandbox's own file system, never on the node's."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response, WebSocket
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from treadle.domain import errors
from treadle.protocol import FileStart
from treadle.protocol.messages import USER_PATTERN
from treadle.weaver.api.deps import Caller, WeaverDep, get_weaver
from treadle.weaver.api.sandbox_errors import sandbox_error
from treadle.weaver.api.sandboxes import running_node, serve_stream
from treadle.weaver.core import Weaver
from treadle.weaver.services.streams import Ended, ExecStream

__all__ = ["check_quota", "disk_quota_mib", "read_through", "router", "write_through"]

router = APIRouter(prefix="/v1/sandboxes", tags=["sandbox files"])
PathQuery = Annotated[str, Query(min_length=1, max_length=4096, pattern=r"^[^\x00]+$")]
# Whose request it is inside the sandbox (a name or uid there); none: the sandbox's user.
UserQuery = Annotated[str | None, Query(pattern=USER_PATTERN)]


def _failed(ended: Ended, path: str, quota_mib: int | None) -> errors.TreadleError:
    return sandbox_error(ended, {"path": path}, quota_mib, prefix=f"{path}: ")


async def _operation(
    weaver: Weaver,
    tenant_id: str,
    sandbox_id: str,
    op: str,
    path: str,
    **options: Any,
) -> tuple[ExecStream, int | None]:
    row, session = await running_node(weaver, tenant_id, sandbox_id)
    stream = weaver.streams.start(
        session, tenant_id, FileStart, row.id, row.incarnation, op=op, path=path, **options
    )
    return stream, disk_quota_mib(row)


def disk_quota_mib(row: Any) -> int | None:
    """The disk a sandbox asked for: what an upload to it may be at most."""
    quota: int | None = (row.spec.get("resources") or {}).get("disk_mib")
    return quota


def check_quota(path: str, sent: int, quota_mib: int | None) -> None:
    """InsufficientStorage once `sent` bytes are past the sandbox's disk: where the tier does
    not hold the sandbox to its disk, this does."""
    if quota_mib is not None and sent > quota_mib * 1024 * 1024:
        raise errors.InsufficientStorage(
            f"{path}: larger than the sandbox's disk ({quota_mib} MiB)",
            details={"path": path, "errno": "EFBIG", "quota_mib": quota_mib},
        )


async def _result(
    weaver: Weaver, tenant_id: str, sandbox_id: str, op: str, path: str, **options: Any
) -> Any:
    stream, quota = await _operation(weaver, tenant_id, sandbox_id, op, path, **options)
    ended = await stream.wait()
    if ended.error is not None:
        raise _failed(ended, path, quota)
    return ended.result


@router.get("/{sandbox_id}/files", summary="List a directory of a sandbox")
async def list_files(
    sandbox_id: str,
    path: PathQuery,
    caller: Caller,
    weaver: WeaverDep,
    depth: Annotated[int, Query(ge=1, le=16)] = 1,
    user: UserQuery = None,
) -> Any:
    items = await _result(
        weaver, caller.tenant_id, sandbox_id, "list", path, depth=depth, user=user
    )
    return {"items": items}


@router.get("/{sandbox_id}/files/stat", summary="What a path of a sandbox is")
async def stat_file(
    sandbox_id: str, path: PathQuery, caller: Caller, weaver: WeaverDep, user: UserQuery = None
) -> Any:
    return await _result(weaver, caller.tenant_id, sandbox_id, "stat", path, user=user)


@router.get("/{sandbox_id}/files/content", summary="Read a file of a sandbox (streamed)")
async def read_file(
    sandbox_id: str, path: PathQuery, caller: Caller, weaver: WeaverDep, user: UserQuery = None
) -> Response:
    stream, quota = await _operation(weaver, caller.tenant_id, sandbox_id, "read", path, user=user)
    body = await read_through(stream)
    if isinstance(body, Ended):
        raise _failed(body, path, quota)
    return StreamingResponse(body, media_type="application/octet-stream")


async def read_through(stream: ExecStream) -> AsyncIterator[bytes] | Ended:
    """A read's bytes as they come, or how it failed when it failed before the first one.
    A reader that stops early leaves the stream (the node stops reading the file)."""
    chunks = stream.output()
    first = await anext(chunks, None)
    if first is None and stream.ended is not None and stream.ended.error is not None:
        return stream.ended

    async def body() -> AsyncIterator[bytes]:
        try:
            if first is not None:
                yield first[1]
            async for _, data in chunks:
                yield data
        finally:
            if stream.ended is None:
                stream.detach()

    return body()


async def write_through(
    stream: ExecStream, chunks: AsyncIterator[bytes], path: str, quota_mib: int | None
) -> Ended:
    """Feed an upload at the pace the sandbox writes it, then end it; how it ended. Past the
    sandbox's disk quota it is InsufficientStorage (`check_quota`); given up midway, the
    stream is left."""
    sent = 0
    try:
        async for chunk in chunks:
            sent += len(chunk)
            if stream.over:
                break  # it failed (a full disk): its error says why
            check_quota(path, sent, quota_mib)
            if chunk:
                stream.write(chunk)
                await stream.drain()
    except BaseException:
        if stream.ended is None:
            stream.detach()
        raise
    stream.write(b"", eof=True)
    return await stream.wait()


@router.put("/{sandbox_id}/files/content", summary="Write a file of a sandbox")
async def write_file(
    sandbox_id: str,
    path: PathQuery,
    request: Request,
    caller: Caller,
    weaver: WeaverDep,
    mode: Annotated[int, Query(ge=0, le=0o7777)] = 0o644,
    user: UserQuery = None,
) -> Any:
    stream, quota = await _operation(
        weaver, caller.tenant_id, sandbox_id, "write", path, mode=mode, user=user
    )
    ended = await write_through(stream, request.stream(), path, quota)
    if ended.error is not None:
        raise _failed(ended, path, quota)
    return {"path": path, "size": ended.result}


class MkdirBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str = Field(min_length=1, max_length=4096, pattern=r"^[^\x00]+$")
    user: str | None = Field(default=None, pattern=USER_PATTERN)


@router.post("/{sandbox_id}/files/mkdir", summary="Make a directory (and its parents)")
async def make_directory(
    sandbox_id: str, body: MkdirBody, caller: Caller, weaver: WeaverDep
) -> Any:
    created = await _result(
        weaver, caller.tenant_id, sandbox_id, "mkdir", body.path, user=body.user
    )
    return {"path": body.path, "created": created}


class MoveBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source: str = Field(min_length=1, max_length=4096, pattern=r"^[^\x00]+$")
    target: str = Field(min_length=1, max_length=4096, pattern=r"^[^\x00]+$")
    user: str | None = Field(default=None, pattern=USER_PATTERN)


@router.post("/{sandbox_id}/files/move", summary="Move or rename a path")
async def move_file(sandbox_id: str, body: MoveBody, caller: Caller, weaver: WeaverDep) -> Any:
    await _result(
        weaver,
        caller.tenant_id,
        sandbox_id,
        "move",
        body.source,
        target=body.target,
        user=body.user,
    )
    return {"source": body.source, "target": body.target}


@router.delete("/{sandbox_id}/files", status_code=204, summary="Remove a path (recursively)")
async def remove_file(
    sandbox_id: str, path: PathQuery, caller: Caller, weaver: WeaverDep, user: UserQuery = None
) -> Response:
    await _result(weaver, caller.tenant_id, sandbox_id, "remove", path, user=user)
    return Response(status_code=204)


# What a node may send of one change; any other line is dropped.
_CHANGES = frozenset({"create", "write", "remove", "rename", "chmod"})
_MAX_LINE = 16 * 1024


def _change(line: bytes) -> dict[str, Any] | None:
    try:
        raw = json.loads(line)
    except ValueError:
        return None
    if not isinstance(raw, dict):
        return None
    kind, name, is_dir = raw.get("type"), raw.get("name"), raw.get("dir")
    if kind not in _CHANGES or not isinstance(name, str) or not isinstance(is_dir, bool):
        return None
    return {"type": kind, "name": name, "dir": is_dir}


@router.websocket("/{sandbox_id}/files/watch")
async def watch_files(websocket: WebSocket, sandbox_id: str) -> None:
    """Changes under a directory as they happen: `{"watching": path}` once the watch is in
    place, then `{"type": create|write|remove|rename|chmod, "name": path relative to the
    directory, "dir": bool}` per change (a write in many
    pieces is one), until the client leaves or the directory goes (then `{"end": …}`).
    Query: `path`, `recursive` (its subdirectories too, those made later included), `user`."""
    weaver = get_weaver(websocket)
    path = websocket.query_params.get("path", "")
    recursive = websocket.query_params.get("recursive", "false").lower() in ("1", "true")
    user = websocket.query_params.get("user")
    quota: int | None = None

    async def opening(tenant_id: str) -> ExecStream:
        nonlocal quota
        if not path or len(path) > 4096 or "\x00" in path:
            raise errors.InvalidRequest("path must be 1-4096 characters", details={"path": path})
        if user is not None and not re.fullmatch(USER_PATTERN, user):
            raise errors.InvalidRequest(f"invalid user {user!r}", details={"user": user})
        stream, quota = await _operation(
            weaver, tenant_id, sandbox_id, "watch", path, recursive=recursive, user=user
        )
        return stream

    async def relay(websocket: WebSocket, stream: ExecStream) -> None:
        if await stream.started() is not None:
            await websocket.send_json({"watching": path})
        pending = b""
        async for _, data in stream.output():
            pending += data
            *lines, pending = pending.split(b"\n")
            if len(pending) > _MAX_LINE:
                pending = b""  # not a change a node would send
            for line in lines:
                change = _change(line)
                if change is not None:
                    await websocket.send_json(change)
        ended = stream.ended
        assert ended is not None
        if ended.error is not None:
            raise _failed(ended, path, quota)
        await websocket.send_json({"end": "the directory is gone"})
        await websocket.close(code=1000)

    await serve_stream(websocket, opening, relay)
