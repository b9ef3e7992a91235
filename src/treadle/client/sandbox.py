"""`Sandbox`: a long-lived sandbox driven from blocking code.

    from treadle import Sandbox

    with Sandbox.create(timeout=300, metadata={"agent": "a1"}) as sbx:  # killed at the end
        print(sbx.run("echo hi").stdout)
        sbx.files.write("data.txt", b"...")
        with sbx.exec(["python3", "-u", "serve.py"], tag="srv") as process:
            for channel, data in process:  # ("stdout" | "stderr", bytes), as they come
                ...

Every call is one request to the API (docs/api.md "Sandboxes"); the answers are the API's
JSON as plain dicts, errors `TreadleAPIError` / `TreadleConnectionError` as for `Client`.
The asyncio twin is `treadle.client.AsyncSandbox`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Unpack

import httpx

from treadle.client import _api
from treadle.client import _sandbox_api as sapi
from treadle.client._api import JSONObject
from treadle.client._sandbox_api import Chunk, ExecResult, ProcessStream, SandboxOptions
from treadle.client._sync import STREAM_OPEN_TIMEOUT_S, Client
from treadle.client.desktop import Desktop

if TYPE_CHECKING:
    from websockets.sync.client import ClientConnection

__all__ = ["ExecResult", "Sandbox", "SandboxFiles", "SandboxProcess"]

JSONList = list[JSONObject]  # `list` is a method name below


class SandboxProcess(sapi.ProcessBase["ClientConnection"]):
    """A process in a sandbox, streamed over a WebSocket: from `Sandbox.exec` or `attach`.

    Iterate for its output as `(channel, bytes)` pairs, channel "stdout" or "stderr" (a
    terminal's output is all "stdout"); `wait()` reads to the end and returns the
    `ExecResult`. Closing the handle (or leaving its `with` block) only detaches: the
    process runs on, and `Sandbox.attach(pid or tag)` finds it again.
    """

    _websocket: ClientConnection

    @classmethod
    def _open(cls, client: Client, url: str, messages: Sequence[str]) -> SandboxProcess:
        from websockets.sync.client import connect

        try:
            # Entered, as websockets (17.1+) asks of a connection that is used beyond a
            # `with` block; leaving it is `close()`, which `SandboxProcess.close` does.
            websocket = connect(
                url,
                additional_headers=sapi.auth_headers(client.config),
                open_timeout=STREAM_OPEN_TIMEOUT_S,
                max_size=None,
            ).__enter__()
        except _api.STREAM_ERRORS as exc:
            raise _api.stream_error(url, exc) from exc
        process = cls(websocket, ProcessStream(url))
        try:
            for message in messages:
                process._send(message)
            # Until `started` (or a refusal: it is raised here, not at the first read).
            while not process._stream.opened:
                process._stream.feed(process._recv())
        except BaseException:
            process.close()
            raise
        return process

    def __iter__(self) -> Iterator[Chunk]:
        while (chunk := self._next()) is not None:
            yield chunk

    def wait(self) -> ExecResult:
        """Read to the end. The result's output is what iteration had not handed out."""
        while (chunk := self._next()) is not None:
            self._stream.keep(chunk)
        return self._stream.finish()

    def write(self, data: bytes | str) -> None:
        """Write to its stdin (text as UTF-8); the process takes it at its own pace."""
        self._send(sapi.stdin_message(data))

    def close_stdin(self) -> None:
        """End its stdin (with a terminal: Ctrl-D)."""
        self._send(sapi.eof_message())

    def signal(self, signal: int) -> None:
        """Send it a signal (to its process group), e.g. `signal.SIGTERM`."""
        self._send(sapi.signal_message(signal))

    def kill(self) -> None:
        self.signal(9)

    def resize(self, rows: int, cols: int) -> None:
        """Resize its terminal (a process started with `pty`)."""
        self._send(sapi.resize_message(rows, cols))

    def close(self) -> None:
        """Detach: the connection closes, the process runs on."""
        self._websocket.close()

    def __enter__(self) -> SandboxProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _next(self) -> Chunk | None:
        while self._stream.wants_more:
            self._stream.feed(self._recv())
        chunk = self._stream.next_chunk()
        if chunk is None:
            self.close()  # it ended: the server closes too
        return chunk

    def _recv(self) -> str | bytes:
        try:
            return self._websocket.recv()
        except _api.STREAM_ERRORS as exc:
            raise self._stream.read_error(exc) from exc

    def _send(self, message: str) -> None:
        try:
            self._websocket.send(message)
        except _api.STREAM_ERRORS as exc:
            error = self._stream.send_error(exc)
            if error is not None:
                raise error from exc


def _send_upload(client: Client, upload: sapi.Upload) -> JSONObject:
    try:
        response = client._http.send(upload.request(client))
    except httpx.TransportError as exc:
        raise _api.connection_error(client.config.url, exc) from exc
    return upload.call.parse(response)


class SandboxFiles:
    """The files of a running sandbox (`sandbox.files`); paths as the sandbox sees them,
    relative ones from its home."""

    def __init__(self, client: Client, sandbox_id: str) -> None:
        self._client = client
        self._id = sandbox_id

    def read(self, path: str) -> bytes:
        return self._client._send(sapi.read_file(self._id, path))

    def read_text(self, path: str, encoding: str = "utf-8") -> str:
        return self.read(path).decode(encoding)

    def write(self, path: str, data: bytes | str, *, mode: int = 0o644) -> JSONObject:
        """Write a whole file (text as UTF-8; up to the sandbox's disk), making its parent
        directories: `{"path", "size"}`."""
        return _send_upload(self._client, sapi.write_file(self._id, path, data, mode))

    def list(self, path: str = ".", depth: int = 1) -> JSONList:
        """The entries under `path`, `depth` levels down: `{"name", "path", "type", "size",
        "mode", "mtime", "uid", "gid", "target"?}` each."""
        return self._client._send(sapi.list_files(self._id, path, depth))

    def stat(self, path: str) -> JSONObject:
        return self._client._send(sapi.stat_file(self._id, path))

    def mkdir(self, path: str) -> bool:
        """Make a directory and its parents; False when it was there already."""
        return bool(self._client._send(sapi.make_directory(self._id, path))["created"])

    def move(self, source: str, target: str) -> None:
        self._client._send(sapi.move_file(self._id, source, target))

    def remove(self, path: str) -> None:
        """Remove a file, or a directory with all it holds."""
        self._client._send(sapi.delete_file(self._id, path))

    def watch(self, path: str, *, recursive: bool = False) -> Iterator[JSONObject]:
        """Changes under the directory `path` as they happen, every one made after this
        returns (the watch is then in place): `{"type": "create"|"write"|"remove"|"rename"|
        "chmod", "name", "dir"}`. Ends when the directory goes; stop early by leaving the
        loop (or `close()` on the iterator)."""
        from websockets.sync.client import connect

        url = sapi.watch_url(self._client.config.url, self._id, path, recursive)
        try:
            websocket = connect(
                url,
                additional_headers=sapi.auth_headers(self._client.config),
                open_timeout=STREAM_OPEN_TIMEOUT_S,
            ).__enter__()  # as `SandboxProcess._open`: left by `_changes` or `close()`
        except _api.STREAM_ERRORS as exc:
            raise _api.stream_error(url, exc) from exc
        try:
            placed = sapi.watch_event(websocket.recv(), url)  # `watching`, or a refusal
        except BaseException as exc:
            websocket.close()
            if isinstance(exc, _api.STREAM_ERRORS):
                raise _api.stream_error(url, exc) from exc
            raise
        return _changes(websocket, url, ended=placed is None)


def _changes(websocket: ClientConnection, url: str, *, ended: bool) -> Iterator[JSONObject]:
    with websocket:
        if ended:
            return
        try:
            for raw in websocket:
                change = sapi.watch_event(raw, url)
                if change is None:
                    return
                yield change
        except _api.STREAM_ERRORS as exc:
            raise _api.stream_error(url, exc) from exc


def _client_for(url: str | None, api_key: str | None, client: Client | None) -> tuple[Client, bool]:
    return (client, False) if client is not None else (Client(url, api_key), True)


class Sandbox(sapi.SandboxBase[Client]):
    """A sandbox: `Sandbox.create(...)` makes one, `Sandbox.connect(id)` finds one.

    Used as a context manager it is killed at the end of the block (`connect`ed ones too).
    Without `client=` it makes its own `Client` (from `url`, `api_key` or the environment)
    and closes it in `close()`; a `client=` given is shared and left open.
    """

    def __init__(
        self,
        sandbox_id: str,
        *,
        client: Client,
        info: JSONObject | None = None,
        owns_client: bool = False,
    ) -> None:
        super().__init__(sandbox_id, client=client, info=info, owns_client=owns_client)
        self.files = SandboxFiles(client, sandbox_id)
        self.desktop = Desktop(client, sandbox_id)

    @classmethod
    def create(
        cls,
        *,
        url: str | None = None,
        api_key: str | None = None,
        client: Client | None = None,
        **options: Unpack[SandboxOptions],
    ) -> Sandbox:
        """Create a sandbox; `options` are the API's create fields (`timeout` in seconds).

        It returns at once, the sandbox still `pending`: `run` and `exec` wait for it to
        start (up to 30 s), and `wait_for_status("running")` waits explicitly."""
        client, owned = _client_for(url, api_key, client)
        try:
            info = client._send(sapi.create_sandbox(options))
        except BaseException:
            if owned:
                client.close()
            raise
        return cls(info["id"], client=client, info=info, owns_client=owned)

    @classmethod
    def connect(
        cls,
        sandbox_id: str,
        *,
        url: str | None = None,
        api_key: str | None = None,
        client: Client | None = None,
    ) -> Sandbox:
        """An existing sandbox (`TreadleAPIError` 404 when the tenant has none by that id)."""
        client, owned = _client_for(url, api_key, client)
        try:
            info = client._send(sapi.get_sandbox(sandbox_id))
        except BaseException:
            if owned:
                client.close()
            raise
        return cls(sandbox_id, client=client, info=info, owns_client=owned)

    @staticmethod
    def list(
        *,
        status: str | Sequence[str] | None = None,
        metadata: Mapping[str, str] | None = None,
        url: str | None = None,
        api_key: str | None = None,
        client: Client | None = None,
        page_size: int = 100,
    ) -> Iterator[JSONObject]:
        """The tenant's sandboxes as the API's dicts, newest first, pages fetched as it goes;
        every `metadata` pair must match, any `status` may. `Sandbox.connect(item["id"])`
        gives one to act on."""
        client, owned = _client_for(url, api_key, client)
        pages = sapi.Pages(status, metadata, page_size)
        try:
            while (call := pages.next_call()) is not None:
                yield from pages.items(client._send(call))
        finally:
            if owned:
                client.close()

    # state

    def refresh(self) -> JSONObject:
        return self._seen(self._client._send(sapi.get_sandbox(self.id)))

    def wait_for_status(self, *statuses: str, timeout: float = 60.0) -> JSONObject:
        """Poll until the sandbox is in one of `statuses` (default "running"); raises
        `TimeoutError` after `timeout` s and `TreadleClientError` once it ended otherwise."""
        poll = sapi.StatusPoll(self.id, statuses or ("running",), timeout)
        while not poll.done(self.refresh()):
            time.sleep(poll.next_delay())
        return self._info

    def pause(self) -> JSONObject:
        """Freeze every process in place (desired `paused`; status follows when its node has
        done it). 409 in the `process` tier."""
        return self._seen(self._client._send(sapi.pause_sandbox(self.id)))

    def resume(self) -> JSONObject:
        return self._seen(self._client._send(sapi.resume_sandbox(self.id)))

    def set_timeout(self, seconds: float) -> JSONObject:
        """End its TTL `seconds` from now."""
        return self._seen(self._client._send(sapi.set_timeout(self.id, seconds)))

    def kill(self) -> JSONObject:
        """Stop it and free all it holds (its processes get SIGTERM, then SIGKILL)."""
        return self._seen(self._client._send(sapi.kill_sandbox(self.id)))

    # processes

    def run(
        self,
        cmd: str | Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        stdin: str | None = None,
        timeout: float | None = None,
        tag: str | None = None,
        user: str | None = None,
    ) -> ExecResult:
        """Run a process to its end: `cmd` an argv, or a string for `/bin/sh -c`. `timeout`
        (default 60 s) kills it; a non-zero exit is not an error (see `ExecResult.ok`).
        `user`: a user of the sandbox's to run it as (e.g. "root"), where its tier has users."""
        call = sapi.run(
            self.id, cmd, env=env, cwd=cwd, stdin=stdin, timeout=timeout, tag=tag, user=user
        )
        return self._client._send(call)

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
    ) -> SandboxProcess:
        """Start a process and stream it; returns once it started (`pid` known).

        `stdin`: False closes it at once, True keeps it open for `write()`, bytes or text
        are written then closed. `pty` gives it a terminal of `(rows, cols)` (True: 24x80).
        `tag` names it for `attach`; `timeout` kills it after that many seconds; `user` runs
        it as another user of the sandbox's."""
        messages = sapi.opening_messages(
            cmd, stdin=stdin, pty=pty, env=env, cwd=cwd, tag=tag, timeout=timeout, user=user
        )
        url = sapi.exec_url(self._client.config.url, self.id)
        return SandboxProcess._open(self._client, url, messages)

    def attach(self, ref: int | str) -> SandboxProcess:
        """A running (or recently ended) process again, by pid or tag: first the output kept
        while nobody was attached (up to 1 MiB), then live."""
        url = sapi.attach_url(self._client.config.url, self.id, ref)
        return SandboxProcess._open(self._client, url, ())

    def processes(self) -> JSONList:
        """The running processes and the last that ended: `{"pid", "tag", "argv", "pty",
        "running", "exit_code", "signal", …}` each."""
        return self._client._send(sapi.processes(self.id))

    def signal_process(self, ref: int | str, signal: int = 15) -> JSONObject | None:
        """Signal a process by pid or tag, without a stream; the process as now listed."""
        return self._client._send(sapi.signal_process(self.id, ref, signal))

    def url(self, port: int, path: str = "/", expires_in: float = 3600.0) -> str:
        """A signed URL to `port` in the sandbox that works without headers until it expires."""
        return self._client._send(sapi.port_url(self.id, port, path=path, expires_in=expires_in))

    # lifetime

    def close(self) -> None:
        """Close the client it made (the sandbox itself goes on; `kill()` stops it)."""
        if self._owns_client:
            self._client.close()

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self.kill()
        finally:
            self.close()
