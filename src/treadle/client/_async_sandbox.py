"""`AsyncSandbox`: `Sandbox` for asyncio, the same methods, awaitable.

from treadle import AsyncSandbox

async with AsyncSandbox.create(timeout=300) as sbx:  # or: sbx = await AsyncSandbox.create()
    print((await sbx.run("echo hi")).stdout)
    async with sbx.exec("cat", stdin=True) as process:  # or: process = await sbx.exec(...)
        await process.write(b"hello")
        await process.close_stdin()
        async for channel, data in process:
            ...
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Coroutine, Generator, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, TypeVar, Unpack

import httpx

from treadle.client import _api
from treadle.client import _sandbox_api as sapi
from treadle.client._api import JSONObject
from treadle.client._async import AsyncClient
from treadle.client._sandbox_api import Chunk, ExecResult, ProcessStream, SandboxOptions
from treadle.client._sync import STREAM_OPEN_TIMEOUT_S
from treadle.client.desktop import AsyncDesktop

if TYPE_CHECKING:
    from websockets.asyncio.client import ClientConnection

__all__ = ["AsyncSandbox", "AsyncSandboxFiles", "AsyncSandboxProcess", "Opening"]

JSONList = list[JSONObject]  # `list` is a method name below
T = TypeVar("T", bound="AsyncSandbox | AsyncSandboxProcess")


class Opening(Generic[T]):
    """What `AsyncSandbox.create`, `connect`, `exec` and `attach` return: `await` it for the
    object, or `async with` it to have the object closed (a sandbox: killed) at the end."""

    __slots__ = ("_coro", "_value")

    def __init__(self, coro: Coroutine[Any, Any, T]) -> None:
        self._coro = coro
        self._value: T | None = None

    def __await__(self) -> Generator[Any, None, T]:
        return self._coro.__await__()

    async def __aenter__(self) -> T:
        self._value = await self._coro
        return self._value

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._value is not None:
            await self._value.__aexit__(exc_type, exc, tb)


class AsyncSandboxProcess(sapi.ProcessBase["ClientConnection"]):
    """`SandboxProcess` for asyncio: `async for channel, data in process`, `await wait()`."""

    _websocket: ClientConnection

    @classmethod
    async def _open(
        cls, client: AsyncClient, url: str, messages: Sequence[str]
    ) -> AsyncSandboxProcess:
        from websockets.asyncio.client import connect

        try:
            websocket = await connect(
                url,
                additional_headers=sapi.auth_headers(client.config),
                open_timeout=STREAM_OPEN_TIMEOUT_S,
                max_size=None,
            )
        except _api.STREAM_ERRORS as exc:
            raise _api.stream_error(url, exc) from exc
        process = cls(websocket, ProcessStream(url))
        try:
            for message in messages:
                await process._send(message)
            while not process._stream.opened:
                process._stream.feed(await process._recv())
        except BaseException:
            await process.close()
            raise
        return process

    async def __aiter__(self) -> AsyncIterator[Chunk]:
        while (chunk := await self._next()) is not None:
            yield chunk

    async def wait(self) -> ExecResult:
        while (chunk := await self._next()) is not None:
            self._stream.keep(chunk)
        return self._stream.finish()

    async def write(self, data: bytes | str) -> None:
        await self._send(sapi.stdin_message(data))

    async def close_stdin(self) -> None:
        await self._send(sapi.eof_message())

    async def signal(self, signal: int) -> None:
        await self._send(sapi.signal_message(signal))

    async def kill(self) -> None:
        await self.signal(9)

    async def resize(self, rows: int, cols: int) -> None:
        await self._send(sapi.resize_message(rows, cols))

    async def close(self) -> None:
        """Detach: the connection closes, the process runs on."""
        await self._websocket.close()

    async def __aenter__(self) -> AsyncSandboxProcess:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _next(self) -> Chunk | None:
        while self._stream.wants_more:
            self._stream.feed(await self._recv())
        chunk = self._stream.next_chunk()
        if chunk is None:
            await self.close()
        return chunk

    async def _recv(self) -> str | bytes:
        try:
            return await self._websocket.recv()
        except _api.STREAM_ERRORS as exc:
            raise self._stream.read_error(exc) from exc

    async def _send(self, message: str) -> None:
        try:
            await self._websocket.send(message)
        except _api.STREAM_ERRORS as exc:
            error = self._stream.send_error(exc)
            if error is not None:
                raise error from exc


async def _send_upload(client: AsyncClient, upload: sapi.Upload) -> JSONObject:
    try:
        response = await client._http.send(upload.request(client))
    except httpx.TransportError as exc:
        raise _api.connection_error(client.config.url, exc) from exc
    return upload.call.parse(response)


class AsyncSandboxFiles:
    """`SandboxFiles` for asyncio."""

    def __init__(self, client: AsyncClient, sandbox_id: str) -> None:
        self._client = client
        self._id = sandbox_id

    async def read(self, path: str) -> bytes:
        return await self._client._send(sapi.read_file(self._id, path))

    async def read_text(self, path: str, encoding: str = "utf-8") -> str:
        return (await self.read(path)).decode(encoding)

    async def write(self, path: str, data: bytes | str, *, mode: int = 0o644) -> JSONObject:
        return await _send_upload(self._client, sapi.write_file(self._id, path, data, mode))

    async def list(self, path: str = ".", depth: int = 1) -> JSONList:
        return await self._client._send(sapi.list_files(self._id, path, depth))

    async def stat(self, path: str) -> JSONObject:
        return await self._client._send(sapi.stat_file(self._id, path))

    async def mkdir(self, path: str) -> bool:
        return bool((await self._client._send(sapi.make_directory(self._id, path)))["created"])

    async def move(self, source: str, target: str) -> None:
        await self._client._send(sapi.move_file(self._id, source, target))

    async def remove(self, path: str) -> None:
        await self._client._send(sapi.delete_file(self._id, path))

    async def watch(self, path: str, *, recursive: bool = False) -> AsyncIterator[JSONObject]:
        """`SandboxFiles.watch` for asyncio: `async for change in await files.watch(p)`;
        every change made after the await returns is seen."""
        from websockets.asyncio.client import connect

        url = sapi.watch_url(self._client.config.url, self._id, path, recursive)
        try:
            websocket = await connect(
                url,
                additional_headers=sapi.auth_headers(self._client.config),
                open_timeout=STREAM_OPEN_TIMEOUT_S,
            )
        except _api.STREAM_ERRORS as exc:
            raise _api.stream_error(url, exc) from exc
        try:
            placed = sapi.watch_event(await websocket.recv(), url)
        except BaseException as exc:
            await websocket.close()
            if isinstance(exc, _api.STREAM_ERRORS):
                raise _api.stream_error(url, exc) from exc
            raise
        return _changes(websocket, url, ended=placed is None)


async def _changes(
    websocket: ClientConnection, url: str, *, ended: bool
) -> AsyncIterator[JSONObject]:
    async with websocket:
        if ended:
            return
        try:
            async for raw in websocket:
                change = sapi.watch_event(raw, url)
                if change is None:
                    return
                yield change
        except _api.STREAM_ERRORS as exc:
            raise _api.stream_error(url, exc) from exc


def _client_for(
    url: str | None, api_key: str | None, client: AsyncClient | None
) -> tuple[AsyncClient, bool]:
    return (client, False) if client is not None else (AsyncClient(url, api_key), True)


class AsyncSandbox(sapi.SandboxBase[AsyncClient]):
    """`Sandbox` for asyncio; `async with` kills it at the end, `aclose()` closes the client
    it made."""

    def __init__(
        self,
        sandbox_id: str,
        *,
        client: AsyncClient,
        info: JSONObject | None = None,
        owns_client: bool = False,
    ) -> None:
        super().__init__(sandbox_id, client=client, info=info, owns_client=owns_client)
        self.files = AsyncSandboxFiles(client, sandbox_id)
        self.desktop = AsyncDesktop(client, sandbox_id)

    @classmethod
    def create(
        cls,
        *,
        url: str | None = None,
        api_key: str | None = None,
        client: AsyncClient | None = None,
        **options: Unpack[SandboxOptions],
    ) -> Opening[AsyncSandbox]:
        return Opening(cls._make(sapi.create_sandbox(options), url, api_key, client))

    @classmethod
    def connect(
        cls,
        sandbox_id: str,
        *,
        url: str | None = None,
        api_key: str | None = None,
        client: AsyncClient | None = None,
    ) -> Opening[AsyncSandbox]:
        return Opening(cls._make(sapi.get_sandbox(sandbox_id), url, api_key, client))

    @classmethod
    async def _make(
        cls,
        call: _api.Call[JSONObject],
        url: str | None,
        api_key: str | None,
        client: AsyncClient | None,
    ) -> AsyncSandbox:
        client, owned = _client_for(url, api_key, client)
        try:
            info = await client._send(call)
        except BaseException:
            if owned:
                await client.aclose()
            raise
        return cls(info["id"], client=client, info=info, owns_client=owned)

    @staticmethod
    async def list(
        *,
        status: str | Sequence[str] | None = None,
        metadata: Mapping[str, str] | None = None,
        url: str | None = None,
        api_key: str | None = None,
        client: AsyncClient | None = None,
        page_size: int = 100,
    ) -> AsyncIterator[JSONObject]:
        """`async for item in AsyncSandbox.list(metadata={...})`: the API's dicts."""
        client, owned = _client_for(url, api_key, client)
        pages = sapi.Pages(status, metadata, page_size)
        try:
            while (call := pages.next_call()) is not None:
                for item in pages.items(await client._send(call)):
                    yield item
        finally:
            if owned:
                await client.aclose()

    # state

    async def refresh(self) -> JSONObject:
        return self._seen(await self._client._send(sapi.get_sandbox(self.id)))

    async def wait_for_status(
        self,
        *statuses: str,
        timeout: float = 60.0,  # noqa: ASYNC109 - as `Sandbox.wait_for_status`
    ) -> JSONObject:
        poll = sapi.StatusPoll(self.id, statuses or ("running",), timeout)
        # Polling the API: there is no event to wait on.
        while not poll.done(await self.refresh()):  # noqa: ASYNC110
            await asyncio.sleep(poll.next_delay())
        return self._info

    async def pause(self) -> JSONObject:
        return self._seen(await self._client._send(sapi.pause_sandbox(self.id)))

    async def resume(self) -> JSONObject:
        return self._seen(await self._client._send(sapi.resume_sandbox(self.id)))

    async def set_timeout(self, seconds: float) -> JSONObject:
        return self._seen(await self._client._send(sapi.set_timeout(self.id, seconds)))

    async def kill(self) -> JSONObject:
        return self._seen(await self._client._send(sapi.kill_sandbox(self.id)))

    # processes

    async def run(
        self,
        cmd: str | Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        stdin: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - the process's, in the sandbox
        tag: str | None = None,
        user: str | None = None,
    ) -> ExecResult:
        call = sapi.run(
            self.id, cmd, env=env, cwd=cwd, stdin=stdin, timeout=timeout, tag=tag, user=user
        )
        return await self._client._send(call)

    def exec(
        self,
        cmd: str | Sequence[str],
        *,
        stdin: bool | bytes | str = False,
        pty: tuple[int, int] | bool | None = None,
        tag: str | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
        user: str | None = None,
    ) -> Opening[AsyncSandboxProcess]:
        messages = sapi.opening_messages(
            cmd, stdin=stdin, pty=pty, env=env, cwd=cwd, tag=tag, timeout=timeout, user=user
        )
        url = sapi.exec_url(self._client.config.url, self.id)
        return Opening(AsyncSandboxProcess._open(self._client, url, messages))

    def attach(self, ref: int | str) -> Opening[AsyncSandboxProcess]:
        url = sapi.attach_url(self._client.config.url, self.id, ref)
        return Opening(AsyncSandboxProcess._open(self._client, url, ()))

    async def processes(self) -> JSONList:
        return await self._client._send(sapi.processes(self.id))

    async def signal_process(self, ref: int | str, signal: int = 15) -> JSONObject | None:
        """Signal a process by pid or tag, without a stream; the process as now listed."""
        return await self._client._send(sapi.signal_process(self.id, ref, signal))

    async def url(self, port: int, path: str = "/", expires_in: float = 3600.0) -> str:
        call = sapi.port_url(self.id, port, path=path, expires_in=expires_in)
        return await self._client._send(call)

    # lifetime

    async def aclose(self) -> None:
        if self._owns_client:
            await self._client.aclose()

    async def __aenter__(self) -> AsyncSandbox:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            await self.kill()
        finally:
            await self.aclose()
