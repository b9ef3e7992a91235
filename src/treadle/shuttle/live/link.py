"""Shuttle's end of the channel to a sandbox's guest agent (`treadle.guest.agent`).

One link per sandbox, over two pipes: requests to the agent's stdin, events from its stdout.
What comes back is untrusted (the sandbox's code can replace the agent) and is held to
`treadle.protocol.guest`; a frame outside it, output past the window this side granted, or
an answer to nothing asked breaks the link, and the sandbox is ended by its owner.

Flow control is per stream: a process's output and a file's download each have a window of
bytes that this side grants as its consumer takes what came, so a consumer that stops
reading holds back that stream only (the agent stops reading that process's pipes), never the
link, another process or another sandbox. Bytes held here per stream stay under its window.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno as errnos
import os
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from treadle.protocol.guest import (
    Data,
    Done,
    Error,
    Event,
    Exit,
    FrameReader,
    GuestProtocolError,
    Out,
    Ready,
    Result,
    Size,
    Started,
    encode_request,
)

__all__ = ["GuestError", "GuestLink", "GuestProcess", "LinkBroken", "ProcessExit"]

WINDOW = 1024 * 1024
CHUNK = 256 * 1024
# Requests queued for the agent past which a sender waits (uploads, stdin).
_SEND_HIGH_WATER = 4 * CHUNK


class LinkBroken(Exception):
    """The link to the guest agent is gone (the sandbox ended) or was broken by it."""


class GuestError(Exception):
    """The agent could not do what was asked (a file that is not there, a bad path...)."""

    def __init__(self, errno: str, message: str | None) -> None:
        super().__init__(f"{errno}: {message}" if message else errno)
        self.errno = errno
        self.message = message or errno

    def code(self) -> int:
        return int(getattr(errnos, self.errno, errnos.EIO))


@dataclass(frozen=True, slots=True)
class ProcessExit:
    exit_code: int | None
    signal: int | None


class GuestProcess:
    """A process the agent started: its output as it comes, its stdin, its exit."""

    def __init__(self, link: GuestLink, pid: int, tag: str | None) -> None:
        self._link = link
        self.pid = pid
        self.tag = tag
        self.os_pid: int | None = None
        self._chunks: asyncio.Queue[tuple[str, bytes] | None] = asyncio.Queue()
        self._held = 0  # bytes received and not yet taken by the consumer
        self._exit: asyncio.Future[ProcessExit] = asyncio.get_running_loop().create_future()

    async def output(self) -> AsyncIterator[tuple[str, bytes]]:
        """(stream, bytes) as the process writes them, until it has exited."""
        while True:
            item = await self._chunks.get()
            if item is None:
                self._chunks.put_nowait(None)  # for any other reader
                return
            self._held -= len(item[1])
            self._link.send({"op": "window", "pid": self.pid, "bytes": len(item[1])})
            yield item

    async def wait(self) -> ProcessExit:
        return await asyncio.shield(self._exit)

    @property
    def exit(self) -> ProcessExit | None:
        """How it exited; None while it runs, or when the link ended before it said."""
        if not self._exit.done() or self._exit.exception() is not None:
            return None
        return self._exit.result()

    @property
    def over(self) -> bool:
        return self._exit.done()

    async def write_stdin(self, data: bytes) -> None:
        for start in range(0, len(data), CHUNK):
            await self._link.request({"op": "stdin", "pid": self.pid}, data[start : start + CHUNK])

    def close_stdin(self) -> None:
        self._link.send({"op": "stdin_close", "pid": self.pid})

    def signal(self, number: int) -> None:
        self._link.send({"op": "signal", "pid": self.pid, "signal": number})

    def resize(self, rows: int, cols: int) -> None:
        self._link.send({"op": "resize", "pid": self.pid, "rows": rows, "cols": cols})

    def _out(self, stream: str, data: bytes) -> None:
        self._held += len(data)
        if self._held > WINDOW:
            raise GuestProtocolError(f"process {self.pid} sent past its window")
        self._chunks.put_nowait((stream, data))

    def _ended(self, result: ProcessExit | BaseException) -> None:
        if self._exit.done():
            return
        if isinstance(result, BaseException):
            self._exit.set_exception(result)
            self._exit.exception()  # retrieved: nobody may be waiting
        else:
            self._exit.set_result(result)
        self._chunks.put_nowait(None)


class _Download:
    def __init__(self) -> None:
        self.chunks: asyncio.Queue[bytes | BaseException | None] = asyncio.Queue()
        self.held = 0


class GuestLink:
    """Requests to the agent and what it answers. `on_broken` is called once, with why,
    when the agent breaks the protocol (not when the link simply ends). `preamble`: the
    exact bytes the guest says before its agent speaks (a VM booted ahead of its workload
    says it waits); anything else breaks the link."""

    def __init__(
        self,
        to_guest: int,
        from_guest: int,
        *,
        on_broken: Callable[[str], None],
        preamble: bytes = b"",
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._preamble = preamble
        self._booted: asyncio.Future[None] = self._loop.create_future()
        if not preamble:
            self._booted.set_result(None)
        self._to, self._from = to_guest, from_guest
        for fd in (to_guest, from_guest):
            os.set_blocking(fd, False)
        self._on_broken = on_broken
        self._reader = FrameReader()
        self._out = bytearray()
        self._drained = asyncio.Event()
        self._drained.set()
        self._writing = False
        self._closed: BaseException | None = None
        self._ready: asyncio.Future[Ready] = self._loop.create_future()
        self._processes: dict[int, GuestProcess] = {}
        self._requests: dict[int, asyncio.Future[Any]] = {}
        self._downloads: dict[int, _Download] = {}
        # Asked, and then no longer waited for (cancelled callers, downloads given up): what
        # the agent still sends for these is dropped; anything else unasked breaks the link.
        self._abandoned: deque[int] = deque(maxlen=1024)
        self._next = 0
        self._loop.add_reader(from_guest, self._readable)

    async def ready(self) -> Ready:
        return await asyncio.shield(self._ready)

    async def booted(self) -> None:
        """Once the guest has said its preamble."""
        await asyncio.shield(self._booted)

    def preface(self, data: bytes) -> None:
        """Send `data` as is, ahead of any request: what the guest reads before its agent
        runs (a waiting VM's settings)."""
        if self._closed is not None:
            raise LinkBroken(str(self._closed))
        self._out += data
        self._flush()

    @property
    def closed(self) -> bool:
        return self._closed is not None

    # processes

    async def exec(
        self,
        argv: list[str],
        *,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        tag: str | None = None,
        stdin: bool = False,
        pty: tuple[int, int] | None = None,
        user: str | None = None,
        service: bool = False,
        drain_s: float | None = None,
    ) -> GuestProcess:
        """Start `argv` in the sandbox, as `user` (a name or uid of the sandbox's; None: its
        own user). A `service` (the desktop's sidecars) is not work: neither it nor what it
        starts keeps the sandbox from being idle. `drain_s`: its exit is reported that long
        after it exited at the latest, even while a process it left holds its output open
        (None: once its output has ended)."""
        header: dict[str, Any] = {
            "op": "exec",
            "argv": argv,
            "env": env or {},
            "cwd": cwd,
            "tag": tag,
            "stdin": stdin,
            "user": user,
        }
        if service:
            header["service"] = True
        if drain_s is not None:
            header["drain_s"] = drain_s
        if pty is not None:
            header["pty"] = {"rows": pty[0], "cols": pty[1]}
        return await self._start(header, tag)

    async def connect(self, port: int) -> GuestProcess:
        """A TCP connection to `port` on the sandbox's loopback, made from inside it: the
        server's bytes are its output (`stdout`), its stdin goes to the server, and it
        exits (code 0) once the server has closed; `signal` closes it."""
        return await self._start({"op": "connect", "port": port}, None)

    async def watch(
        self, path: str, *, recursive: bool = False, user: str | None = None
    ) -> GuestProcess:
        """Changes under the directory `path` as its output: JSON lines `{"type", "name",
        "dir"}` (create, write, remove, rename, chmod), until it goes or `signal` ends it."""
        header = {"op": "watch", "path": path, "recursive": recursive, "user": user}
        return await self._start(header, None)

    async def _start(self, header: dict[str, Any], tag: str | None) -> GuestProcess:
        pid = self._id()
        process = GuestProcess(self, pid, tag)
        self._processes[pid] = process
        try:
            process.os_pid = await self.request({**header, "pid": pid, "window": WINDOW})
        except BaseException:
            self._processes.pop(pid, None)
            raise
        return process

    def processes(self) -> list[GuestProcess]:
        """The processes started here that have not exited (none once the link ended)."""
        return [p for p in self._processes.values() if not p.over]

    # files

    async def read_file(
        self, path: str, *, user: str | None = None
    ) -> tuple[int, AsyncIterator[bytes]]:
        """The file's size when opened (as `user`), and its bytes as they come."""
        req = self._id()
        download = _Download()
        self._downloads[req] = download
        opening = {"op": "read", "path": path, "window": WINDOW, "user": user}
        size = await self.request(opening, req=req)
        return int(size), self._download(req, download)

    async def _download(self, req: int, download: _Download) -> AsyncIterator[bytes]:
        try:
            while True:
                item = await download.chunks.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                download.held -= len(item)
                self.send({"op": "read_window", "req": req, "bytes": len(item)})
                yield item
        finally:
            if self._downloads.pop(req, None) is not None:
                self._abandoned.append(req)
                with contextlib.suppress(LinkBroken):
                    self.send({"op": "read_cancel", "req": req})

    async def write_file(
        self,
        path: str,
        data: bytes | AsyncIterable[bytes],
        *,
        mode: int = 0o644,
        parents: bool = True,
        append: bool = False,
        user: str | None = None,
    ) -> int:
        """Write `data` to `path` (opened as `user`); returns the file's size after."""
        req = self._id()
        open_ = {"op": "write_open", "path": path, "mode": mode, "parents": parents, "user": user}
        await self.request({**open_, "append": append}, req=req)
        try:
            if isinstance(data, bytes):
                for start in range(0, len(data), CHUNK):
                    await self._send_data(req, data[start : start + CHUNK])
            else:
                async for chunk in data:
                    for start in range(0, len(chunk), CHUNK):
                        await self._send_data(req, chunk[start : start + CHUNK])
        except GuestError:
            raise
        except BaseException:
            # Given up (its client went away): the agent's answer to the close is not awaited.
            self._abandoned.append(req)
            with contextlib.suppress(LinkBroken):
                self.send({"op": "write_close", "req": req})
            raise
        size: int = await self.request({"op": "write_close"}, req=req)
        return size

    async def _send_data(self, req: int, chunk: bytes) -> None:
        # Each chunk answered: a failed write (a full disk) ends the upload at once, with
        # its own error, and nothing waits in the agent unasked.
        await self.request({"op": "write_data", "ack": True}, chunk, req=req)

    async def call(self, op: str, **fields: Any) -> Any:
        """A request answered by one result: stat, list, mkdir, remove, move, ps."""
        return await self.request({"op": op, **fields})

    # plumbing

    async def request(
        self, header: dict[str, Any], payload: bytes = b"", *, req: int | None = None
    ) -> Any:
        if req is None:
            req = self._id()
        future: asyncio.Future[Any] = self._loop.create_future()
        self._requests[req] = future
        self.send({**header, "req": req}, payload)
        try:
            await self._drain()
            return await future
        finally:
            # A caller cancelled while waiting has its future cancelled with it: the answer
            # still on its way is not waited for.
            if self._requests.pop(req, None) is not None and (
                not future.done() or future.cancelled()
            ):
                self._abandoned.append(req)

    def send(self, header: dict[str, Any], payload: bytes = b"") -> None:
        if self._closed is not None:
            raise LinkBroken(str(self._closed))
        self._out += encode_request(header, payload)
        self._flush()

    async def _drain(self) -> None:
        while len(self._out) > _SEND_HIGH_WATER and self._closed is None:
            self._drained.clear()
            await self._drained.wait()
        if self._closed is not None:
            raise LinkBroken(str(self._closed))

    def _flush(self) -> None:
        try:
            while self._out:
                written = os.write(self._to, self._out)
                del self._out[:written]
        except BlockingIOError:
            pass
        except OSError as exc:
            self._end(LinkBroken(f"the guest agent is gone ({exc.strerror})"))
            return
        if self._out and not self._writing:
            self._loop.add_writer(self._to, self._flush)
            self._writing = True
        elif not self._out and self._writing:
            self._loop.remove_writer(self._to)
            self._writing = False
        if len(self._out) <= _SEND_HIGH_WATER:
            self._drained.set()

    def _id(self) -> int:
        self._next += 1
        return self._next

    def _readable(self) -> None:
        try:
            data = os.read(self._from, 256 * 1024)
        except BlockingIOError:
            return
        except OSError as exc:
            self._end(LinkBroken(f"the guest agent is gone ({exc.strerror})"))
            return
        if not data:
            self._end(LinkBroken("the guest agent is gone"))
            return
        if self._preamble:
            said, data = data[: len(self._preamble)], data[len(self._preamble) :]
            if not self._preamble.startswith(said):
                reason = "the guest broke the protocol: not the preamble it was to say"
                self._end(LinkBroken(reason))
                self._on_broken(reason)
                return
            self._preamble = self._preamble[len(said) :]
            if not self._preamble:
                self._booted.set_result(None)
        try:
            for event, payload in self._reader.feed(data):
                self._dispatch(event, payload)
        except GuestProtocolError as exc:
            reason = f"the guest agent broke the protocol: {exc}"
            self._end(LinkBroken(reason))
            self._on_broken(reason)

    def _dispatch(self, event: Event, payload: bytes) -> None:
        if isinstance(event, Ready):
            if self._ready.done():
                raise GuestProtocolError("ready twice")
            self._ready.set_result(event)
        elif isinstance(event, Started):
            pass  # the exec request's result carries the same
        elif isinstance(event, Out):
            self._process(event.pid)._out(event.stream, payload)
        elif isinstance(event, Exit):
            # Gone from the table: anything more about it is a protocol error. Its holder
            # keeps what it already received.
            self._process(event.pid)._ended(ProcessExit(event.code, event.signal))
            del self._processes[event.pid]
        elif isinstance(event, (Data, Done)):
            download = self._downloads.get(event.req)
            if download is None:
                self._unasked(event.req)
                return
            if isinstance(event, Done):
                del self._downloads[event.req]
                download.chunks.put_nowait(None)
                return
            download.held += len(payload)
            if download.held > WINDOW:
                raise GuestProtocolError(f"download {event.req} sent past its window")
            download.chunks.put_nowait(payload)
        elif isinstance(event, Size):
            self._answer(event.req, event.size)
        elif isinstance(event, Result):
            self._answer(event.req, event.value)
        elif isinstance(event, Error):
            error = GuestError(event.errno, event.message)
            download = self._downloads.pop(event.req, None)
            if download is not None and event.req not in self._requests:
                download.chunks.put_nowait(error)  # the download failed midway
            else:
                self._answer(event.req, error)

    def _process(self, pid: int) -> GuestProcess:
        process = self._processes.get(pid)
        if process is None:
            raise GuestProtocolError(f"event for process {pid}, which was never started")
        return process

    def _answer(self, req: int, value: Any) -> None:
        future = self._requests.get(req)
        if future is not None and future.cancelled():
            return  # its caller was cancelled an instant ago: abandoned, not unasked
        if future is None or future.done():
            self._unasked(req, f"{type(value).__name__} {str(value)[:100]!r}")
            return
        if isinstance(value, BaseException):
            future.set_exception(value)
        else:
            future.set_result(value)

    def _unasked(self, req: int, what: str = "an answer") -> None:
        if req not in self._abandoned:
            raise GuestProtocolError(f"{what} to request {req}, which is not waited for")

    def close(self) -> None:
        self._end(LinkBroken("the sandbox was stopped"))

    def _end(self, error: LinkBroken) -> None:
        if self._closed is not None:
            return
        self._closed = error
        with contextlib.suppress(ValueError, OSError):
            self._loop.remove_reader(self._from)
        if self._writing:
            self._loop.remove_writer(self._to)
            self._writing = False
        for fd in (self._to, self._from):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._out.clear()
        self._drained.set()
        for waited in (self._booted, self._ready):
            if not waited.done():
                waited.set_exception(error)
                waited.exception()
        for future in self._requests.values():
            if not future.done():
                future.set_exception(error)
        for process in self._processes.values():
            process._ended(error)
        for download in self._downloads.values():
            download.chunks.put_nowait(error)
