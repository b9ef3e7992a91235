"""envd's `filesystem.Filesystem` service, on a sandbox's file streams (`FileStart`): the
same operations, done by the same guest agent, as treadle's own files routes.

Watches: `WatchDir` streams a directory's changes; the polled watchers (`CreateWatcher`,
`GetWatcherEvents`, `RemoveWatcher`, which the sync SDK uses) keep a watch open here and
hold its events until asked, at most `MAX_WATCHERS` per sandbox and `MAX_HELD` events (and
`MAX_HELD_BYTES` of names) each, the oldest dropped first. A watcher whose watch ended is
forgotten at once when its sandbox is gone, else `KEEP_ENDED_S` after, if not asked before."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import secrets
import stat
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

from connectrpc.code import Code
from connectrpc.errors import ConnectError
from connectrpc.request import RequestContext
from protobuf import Oneof
from protobuf.wkt.google.protobuf.timestamp_pb import Timestamp

from treadle.domain.errors import NotFound, TreadleError
from treadle.protocol import FileStart
from treadle.weaver.api.e2b.views import state_of
from treadle.weaver.api.sandboxes import running_node
from treadle.weaver.core import Weaver
from treadle.weaver.envd.access import EnvdCaller
from treadle.weaver.envd.errors import caller_of, connect_error, failed
from treadle.weaver.envd.gen.filesystem import filesystem_pb as pb
from treadle.weaver.envd.gen.filesystem.filesystem_connect import Filesystem
from treadle.weaver.services.sandboxes import sandbox_view
from treadle.weaver.services.streams import ExecStream

__all__ = [
    "KEEP_ENDED_S",
    "MAX_HELD",
    "MAX_HELD_BYTES",
    "MAX_WATCHERS",
    "FilesystemService",
    "entry_info",
    "open_file_stream",
]

MAX_WATCHERS = 64
MAX_HELD = 10_000
# What a watcher's held events may take (their names, and a little for each): a name can be
# 16 KiB, and ten thousand of them would otherwise be held per watcher.
MAX_HELD_BYTES = 1024 * 1024
_EVENT_BYTES = 64
KEEP_ENDED_S = 300.0
_TYPES = {"file": pb.FileType.FILE, "dir": pb.FileType.DIRECTORY, "symlink": pb.FileType.SYMLINK}
_EVENTS = {
    "create": pb.EventType.CREATE,
    "write": pb.EventType.WRITE,
    "remove": pb.EventType.REMOVE,
    "rename": pb.EventType.RENAME,
    "chmod": pb.EventType.CHMOD,
}
_NAMES = {0: "root", 1000: "user"}
_PATH_MAX = 4096


def _check_path(path: str) -> str:
    if not path or len(path) > _PATH_MAX or "\x00" in path:
        raise ConnectError(Code.INVALID_ARGUMENT, "a path is 1-4096 characters, without NUL")
    return path


def entry_info(raw: Any) -> pb.EntryInfo:
    """An entry as the guest agent describes it, as envd does."""
    if not isinstance(raw, dict):
        raise ConnectError(Code.INTERNAL, "the sandbox described an entry wrongly")
    kind = raw.get("type")
    mode = int(raw.get("mode") or 0)
    type_bits = {"dir": stat.S_IFDIR, "symlink": stat.S_IFLNK}.get(str(kind), stat.S_IFREG)
    mtime = float(raw.get("mtime") or 0.0)
    when = datetime.datetime.fromtimestamp(mtime, tz=datetime.UTC)
    entry = pb.EntryInfo(
        name=str(raw.get("name", "")),
        type=_TYPES.get(str(kind), pb.FileType.UNSPECIFIED),
        path=str(raw.get("path", "")),
        size=int(raw.get("size") or 0),
        mode=mode,
        permissions=stat.filemode(type_bits | mode),
        owner=_NAMES.get(raw.get("uid", -1), str(raw.get("uid", ""))),
        group=_NAMES.get(raw.get("gid", -1), str(raw.get("gid", ""))),
        modified_time=Timestamp(seconds=int(when.timestamp()), nanos=when.microsecond * 1000),
        is_symlink=kind == "symlink",
    )
    if kind == "symlink" and isinstance(raw.get("target"), str):
        entry.symlink_target = raw["target"]
    return entry


async def open_file_stream(
    weaver: Weaver, caller: EnvdCaller, op: str, path: str, **options: Any
) -> ExecStream:
    """A file operation on the caller's sandbox, as its user."""
    try:
        row, session = await running_node(weaver, caller.tenant_id, caller.sandbox_id)
    except TreadleError as exc:
        raise connect_error(exc) from None
    try:
        return weaver.streams.start(
            session,
            caller.tenant_id,
            FileStart,
            row.id,
            row.incarnation,
            op=op,
            path=path,
            user=caller.user,
            **options,
        )
    except TreadleError as exc:  # the tenant's streams at their limit
        raise connect_error(exc) from None


class _Watcher:
    def __init__(self, stream: ExecStream) -> None:
        self.stream = stream
        self.events: deque[pb.FilesystemEvent] = deque()
        self.held_bytes = 0
        self.task: asyncio.Task[None] | None = None
        self.forget: asyncio.TimerHandle | None = None

    def hold(self, event: pb.FilesystemEvent) -> None:
        self.events.append(event)
        self.held_bytes += len(event.name) + _EVENT_BYTES
        while len(self.events) > MAX_HELD or self.held_bytes > MAX_HELD_BYTES:
            self.held_bytes -= len(self.events.popleft().name) + _EVENT_BYTES

    def take(self) -> list[pb.FilesystemEvent]:
        events = list(self.events)
        self.events.clear()
        self.held_bytes = 0
        return events


class FilesystemService(Filesystem):
    def __init__(self, weaver: Weaver) -> None:
        self._weaver = weaver
        self._watchers: dict[str, dict[str, _Watcher]] = {}  # sandbox id -> id -> watcher

    async def _op(
        self, ctx: RequestContext[Any, Any], op: str, path: str, **options: Any
    ) -> tuple[EnvdCaller, Any]:
        caller = await caller_of(self._weaver, ctx.request_headers)
        stream = await open_file_stream(self._weaver, caller, op, _check_path(path), **options)
        ended = await stream.wait()
        if ended.error is not None:
            raise failed(ended, ended.error)
        return caller, ended.result

    async def stat(
        self, request: pb.StatRequest, ctx: RequestContext[pb.StatRequest, pb.StatResponse]
    ) -> pb.StatResponse:
        _, described = await self._op(ctx, "stat", request.path)
        return pb.StatResponse(entry=entry_info(described))

    async def list_dir(
        self, request: pb.ListDirRequest, ctx: RequestContext[pb.ListDirRequest, pb.ListDirResponse]
    ) -> pb.ListDirResponse:
        depth = min(max(request.depth, 1), 16)
        _, items = await self._op(ctx, "list", request.path, depth=depth)
        return pb.ListDirResponse(entries=[entry_info(item) for item in items or []])

    async def make_dir(
        self, request: pb.MakeDirRequest, ctx: RequestContext[pb.MakeDirRequest, pb.MakeDirResponse]
    ) -> pb.MakeDirResponse:
        _, created = await self._op(ctx, "mkdir", request.path)
        if not created:
            raise ConnectError(Code.ALREADY_EXISTS, f"directory {request.path} already exists")
        _, described = await self._op(ctx, "stat", request.path)
        return pb.MakeDirResponse(entry=entry_info(described))

    async def move(
        self, request: pb.MoveRequest, ctx: RequestContext[pb.MoveRequest, pb.MoveResponse]
    ) -> pb.MoveResponse:
        target = _check_path(request.destination)
        await self._op(ctx, "move", request.source, target=target)
        _, described = await self._op(ctx, "stat", target)
        return pb.MoveResponse(entry=entry_info(described))

    async def remove(
        self, request: pb.RemoveRequest, ctx: RequestContext[pb.RemoveRequest, pb.RemoveResponse]
    ) -> pb.RemoveResponse:
        await self._op(ctx, "remove", request.path)
        return pb.RemoveResponse()

    async def watch_dir(
        self,
        request: pb.WatchDirRequest,
        ctx: RequestContext[pb.WatchDirRequest, pb.WatchDirResponse],
    ) -> AsyncIterator[pb.WatchDirResponse]:
        caller = await caller_of(self._weaver, ctx.request_headers)
        stream = await self._watch(caller, request)
        try:
            yield _watch_response("start", pb.WatchDirResponse.StartEvent())
            async for event in _changes(stream):
                yield _watch_response("filesystem", event)
        finally:
            if stream.ended is None:
                stream.detach()

    async def create_watcher(
        self,
        request: pb.CreateWatcherRequest,
        ctx: RequestContext[pb.CreateWatcherRequest, pb.CreateWatcherResponse],
    ) -> pb.CreateWatcherResponse:
        caller = await caller_of(self._weaver, ctx.request_headers)
        full = ConnectError(Code.RESOURCE_EXHAUSTED, f"at most {MAX_WATCHERS} watchers per sandbox")
        if len(self._watchers.get(caller.sandbox_id, {})) >= MAX_WATCHERS:
            raise full
        stream = await self._watch(caller, request)
        # Counted again: other calls may have made watchers meanwhile.
        mine = self._watchers.setdefault(caller.sandbox_id, {})
        if len(mine) >= MAX_WATCHERS:
            if stream.ended is None:
                stream.detach()
            raise full
        watcher = _Watcher(stream)
        watcher_id = secrets.token_hex(12)
        mine[watcher_id] = watcher
        watcher.task = asyncio.create_task(self._collect(caller.sandbox_id, watcher_id, watcher))
        return pb.CreateWatcherResponse(watcher_id=watcher_id)

    async def _watch(
        self, caller: EnvdCaller, request: pb.WatchDirRequest | pb.CreateWatcherRequest
    ) -> ExecStream:
        """A watch of the directory the request names, once it is in place."""
        path = _check_path(request.path)
        stream = await open_file_stream(
            self._weaver, caller, "watch", path, recursive=request.recursive
        )
        if await stream.started() is None:
            ended = await stream.wait()
            raise failed(ended, ended.error or "the watch did not start")
        return stream

    async def _collect(self, sandbox_id: str, watcher_id: str, watcher: _Watcher) -> None:
        async for event in _changes(watcher.stream):
            watcher.hold(event)
        if self._watchers.get(sandbox_id, {}).get(watcher_id) is not watcher:
            return  # removed
        # The watch ended: its directory went, or its sandbox did. Nobody may come back for
        # what it holds, which must not stay here for good.
        if await self._gone(sandbox_id):
            for other in list(self._watchers.get(sandbox_id, {})):
                self._forget(sandbox_id, other)
        elif self._watchers.get(sandbox_id, {}).get(watcher_id) is watcher:
            watcher.forget = asyncio.get_running_loop().call_later(
                KEEP_ENDED_S, self._forget, sandbox_id, watcher_id
            )

    async def _gone(self, sandbox_id: str) -> bool:
        try:
            row = await self._weaver.sandboxes.get(None, sandbox_id)
        except NotFound:
            return True
        return state_of(sandbox_view(row)) is None

    def _watcher(self, caller: EnvdCaller, watcher_id: str) -> _Watcher:
        watcher = self._watchers.get(caller.sandbox_id, {}).get(watcher_id)
        if watcher is None:
            raise ConnectError(Code.NOT_FOUND, f"watcher {watcher_id} not found")
        return watcher

    async def get_watcher_events(
        self,
        request: pb.GetWatcherEventsRequest,
        ctx: RequestContext[pb.GetWatcherEventsRequest, pb.GetWatcherEventsResponse],
    ) -> pb.GetWatcherEventsResponse:
        caller = await caller_of(self._weaver, ctx.request_headers)
        watcher = self._watcher(caller, request.watcher_id)
        events = watcher.take()
        if not events and watcher.stream.ended is not None:
            # The directory went, or the sandbox stopped: say so once, and forget it.
            self._forget(caller.sandbox_id, request.watcher_id)
            raise ConnectError(Code.NOT_FOUND, f"watcher {request.watcher_id} ended")
        return pb.GetWatcherEventsResponse(events=events)

    async def remove_watcher(
        self,
        request: pb.RemoveWatcherRequest,
        ctx: RequestContext[pb.RemoveWatcherRequest, pb.RemoveWatcherResponse],
    ) -> pb.RemoveWatcherResponse:
        caller = await caller_of(self._weaver, ctx.request_headers)
        self._watcher(caller, request.watcher_id)
        self._forget(caller.sandbox_id, request.watcher_id)
        return pb.RemoveWatcherResponse()

    def _forget(self, sandbox_id: str, watcher_id: str) -> None:
        mine = self._watchers.get(sandbox_id, {})
        watcher = mine.pop(watcher_id, None)
        if not mine:
            self._watchers.pop(sandbox_id, None)
        if watcher is None:
            return
        if watcher.forget is not None:
            watcher.forget.cancel()
        if watcher.task is not None and watcher.task is not asyncio.current_task():
            watcher.task.cancel()
        if watcher.stream.ended is None:
            watcher.stream.detach()


def _watch_response(field: str, value: Any) -> pb.WatchDirResponse:
    event: Any = Oneof(field, value)
    return pb.WatchDirResponse(event=event)


async def _changes(stream: ExecStream) -> AsyncIterator[pb.FilesystemEvent]:
    """The stream's JSON lines as filesystem events; what is not one is dropped."""
    pending = b""
    with contextlib.suppress(asyncio.CancelledError):
        async for _, data in stream.output():
            pending += data
            *lines, pending = pending.split(b"\n")
            if len(pending) > 16 * 1024:
                pending = b""
            for line in lines:
                try:
                    raw = json.loads(line)
                except ValueError:
                    continue
                if not isinstance(raw, dict) or raw.get("type") not in _EVENTS:
                    continue
                if not isinstance(raw.get("name"), str):
                    continue
                yield pb.FilesystemEvent(name=raw["name"], type=_EVENTS[raw["type"]])
