"""The sandbox operations as data, shared by `Sandbox` and `AsyncSandbox`.

As in `_api`: every REST call is a `Call`, and the two classes only move bytes. What the
exec and attach WebSockets say is encoded and decoded here once, by `ProcessStream`, which
keeps a process's state (pid, tag, output not yet handed out, how it ended) for the sync and
the async handle alike.
"""

from __future__ import annotations

import base64
import json
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, Literal, TypedDict, TypeVar, cast
from urllib.parse import urlencode

import httpx
from websockets.exceptions import ConnectionClosed

from treadle.client._api import (
    Call,
    JSONObject,
    Params,
    _segment,
    api_error,
    parse_empty,
    parse_object,
    stream_error,
    timeout_for,
)
from treadle.client.config import ClientConfig
from treadle.client.errors import TreadleAPIError, TreadleClientError, TreadleConnectionError

if TYPE_CHECKING:
    from treadle.client._async import AsyncClient
    from treadle.client._sync import Client

__all__ = [
    "Channel",
    "Chunk",
    "ExecResult",
    "Pages",
    "ProcessBase",
    "ProcessStream",
    "SandboxBase",
    "SandboxOptions",
    "StatusPoll",
    "Upload",
    "attach_url",
    "auth_headers",
    "create_body",
    "create_sandbox",
    "delete_file",
    "eof_message",
    "exec_url",
    "get_sandbox",
    "kill_sandbox",
    "list_files",
    "list_sandboxes",
    "make_directory",
    "move_file",
    "opening_messages",
    "pause_sandbox",
    "port_url",
    "processes",
    "read_file",
    "resize_message",
    "resume_sandbox",
    "run",
    "set_timeout",
    "signal_message",
    "signal_process",
    "stat_file",
    "stdin_message",
    "write_file",
]

Channel = Literal["stdout", "stderr"]
Chunk = tuple[Channel, bytes]
"""One piece of a process's output: `("stdout" | "stderr", data)`."""
_CHANNELS: tuple[Channel, ...] = ("stdout", "stderr")

# Slack on top of an exec's own timeout: the server answers once the process has been killed.
_EXEC_SLACK_S = 15.0
_DEFAULT_EXEC_TIMEOUT_S = 60.0
DEFAULT_PTY_SIZE = (24, 80)
_TERMINAL_STATUSES = ("stopped", "failed")
_POLL_FIRST_S = 0.05
_POLL_MAX_S = 1.0

# The status each error code stands for, for an error that arrives over a WebSocket, where
# there is no HTTP status; what is not here takes the close code's (4400 → 400, 4404 → 404).
_STATUS_BY_CODE = {
    "invalid_request": 422,
    "validation_error": 422,
    "payload_too_large": 413,
    "unauthenticated": 401,
    "forbidden": 403,
    "tier_not_allowed": 403,
    "not_found": 404,
    "conflict": 409,
    "invalid_transition": 409,
    "limit_exceeded": 429,
    "insufficient_storage": 507,
    "unavailable": 503,
}


class SandboxOptions(TypedDict, total=False):
    """The body of `POST /v1/sandboxes` as keyword arguments; `timeout` and `idle_timeout`
    are seconds (the API's `timeout_s` and `idle_timeout_s`). See docs/api.md "Sandboxes"."""

    image: str
    isolation: str
    min_isolation: str
    resources: Mapping[str, Any]
    env: Mapping[str, str]
    network: bool
    placement: Mapping[str, Any]
    metadata: Mapping[str, str]
    timeout: float
    idle_timeout: float
    on_expiry: str
    restart: str
    home: str
    public_ports: bool
    sudo: bool
    # a display: {"width": 1280, "height": 800, "depth": 24} (True: those)
    desktop: Mapping[str, Any] | bool


_RENAMED = {"timeout": "timeout_s", "idle_timeout": "idle_timeout_s"}


def create_body(options: Mapping[str, Any]) -> JSONObject:
    """The create body from `SandboxOptions`; None means "the server's default"."""
    body: JSONObject = {}
    for key, value in options.items():
        if value is None or (key == "desktop" and value is False):
            continue
        if key == "desktop" and value is True:
            value = {}  # the default display
        body[_RENAMED.get(key, key)] = dict(value) if isinstance(value, Mapping) else value
    return body


@dataclass(frozen=True, slots=True)
class ExecResult:
    """How a process ended, and its output.

    `exit_code` is None when a signal (`signal`) killed it or it could not be started
    (`error`); `timed_out` says its timeout killed it; `pid` and `tag` are the process's.
    From `Sandbox.run` the output is the
    whole of it (up to the server's cap: `output_truncated`); from a streaming handle's
    `wait()` it is what iteration had not already handed out. Output is decoded as UTF-8,
    undecodable bytes replaced; iterate over a handle for the exact bytes.
    """

    exit_code: int | None
    signal: int | None = None
    error: str | None = None
    timed_out: bool = False
    stdout: str = ""
    stderr: str = ""
    output_truncated: bool = False
    pid: int | None = None
    tag: str | None = None

    @property
    def ok(self) -> bool:
        """It exited 0, by itself."""
        return self.exit_code == 0 and not self.timed_out

    @classmethod
    def from_json(cls, payload: Mapping[str, Any]) -> ExecResult:
        return cls(
            exit_code=payload.get("exit_code"),
            signal=payload.get("signal"),
            error=payload.get("error"),
            timed_out=bool(payload.get("timed_out", False)),
            stdout=str(payload.get("stdout") or ""),
            stderr=str(payload.get("stderr") or ""),
            output_truncated=bool(payload.get("output_truncated", False)),
            pid=payload.get("pid"),
            tag=payload.get("tag"),
        )


class StatusPoll:
    """Waiting, by polling, for a sandbox to reach one of `statuses` (sync or async)."""

    def __init__(self, sandbox_id: str, statuses: Sequence[str], timeout: float) -> None:
        self.sandbox_id = sandbox_id
        self.statuses = tuple(statuses)
        self.timeout = timeout
        self.deadline = time.monotonic() + timeout
        self._delay = _POLL_FIRST_S

    def done(self, info: Mapping[str, Any]) -> bool:
        """Whether `info` is in a wanted status; raises when it never will be, or too late."""
        status = info.get("status")
        if status in self.statuses:
            return True
        wanted = " or ".join(self.statuses)
        if status in _TERMINAL_STATUSES:
            reason = info.get("end_reason")
            raise TreadleClientError(
                f"sandbox {self.sandbox_id} is {status}{f' ({reason})' if reason else ''}, "
                f"so it will never be {wanted}",
                details=dict(info),
            )
        if time.monotonic() >= self.deadline:
            raise TimeoutError(
                f"sandbox {self.sandbox_id} is still {status}, not {wanted}, "
                f"after {self.timeout:g} s"
            )
        return False

    def next_delay(self) -> float:
        delay = min(self._delay, max(0.0, self.deadline - time.monotonic()))
        self._delay = min(self._delay * 2, _POLL_MAX_S)
        return delay


# --- sandboxes -------------------------------------------------------------------------


def _sandbox(sandbox_id: str, rest: str = "") -> str:
    return f"/v1/sandboxes/{_segment(sandbox_id)}{rest}"


def create_sandbox(options: Mapping[str, Any]) -> Call[JSONObject]:
    return Call("POST", "/v1/sandboxes", parse_object, json=create_body(options))


def list_sandboxes(
    *,
    status: str | Sequence[str] | None = None,
    metadata: Mapping[str, str] | None = None,
    limit: int = 50,
    cursor: str | None = None,
) -> Call[JSONObject]:
    # `status` and `metadata` repeat in the query: httpx sends a list value as a repeated
    # key, which `Params` (one value per key) does not say.
    query: dict[str, Any] = {"limit": limit}
    if status is not None:
        query["status"] = [status] if isinstance(status, str) else list(status)
    if metadata:
        query["metadata"] = [f"{key}:{value}" for key, value in metadata.items()]
    if cursor is not None:
        query["cursor"] = cursor
    return Call("GET", "/v1/sandboxes", parse_object, params=cast(Params, query))


class Pages:
    """The calls that walk `GET /v1/sandboxes` page by page (sync or async)."""

    def __init__(
        self,
        status: str | Sequence[str] | None,
        metadata: Mapping[str, str] | None,
        page_size: int,
    ) -> None:
        self._status, self._metadata, self._page_size = status, metadata, page_size
        self._cursor: str | None = None
        self._done = False

    def next_call(self) -> Call[JSONObject] | None:
        """The next page's call; None after the last page."""
        if self._done:
            return None
        return list_sandboxes(
            status=self._status, metadata=self._metadata, limit=self._page_size, cursor=self._cursor
        )

    def items(self, page: JSONObject) -> list[JSONObject]:
        self._cursor = page.get("next_cursor")
        self._done = not self._cursor
        return list(page["items"])


def get_sandbox(sandbox_id: str) -> Call[JSONObject]:
    return Call("GET", _sandbox(sandbox_id), parse_object)


def kill_sandbox(sandbox_id: str) -> Call[JSONObject]:
    return Call("DELETE", _sandbox(sandbox_id), parse_object)


def pause_sandbox(sandbox_id: str) -> Call[JSONObject]:
    return Call("POST", _sandbox(sandbox_id, "/pause"), parse_object)


def resume_sandbox(sandbox_id: str) -> Call[JSONObject]:
    return Call("POST", _sandbox(sandbox_id, "/resume"), parse_object)


def set_timeout(sandbox_id: str, seconds: float) -> Call[JSONObject]:
    return Call("POST", _sandbox(sandbox_id, "/timeout"), parse_object, json={"timeout_s": seconds})


def _exec_body(
    cmd: str | Sequence[str],
    env: Mapping[str, str] | None,
    cwd: str | None,
    tag: str | None,
    timeout: float | None,
    user: str | None = None,
) -> JSONObject:
    body: JSONObject = {"cmd": cmd if isinstance(cmd, str) else list(cmd)}
    if env:
        body["env"] = dict(env)
    for key, value in (("cwd", cwd), ("tag", tag), ("timeout_s", timeout), ("user", user)):
        if value is not None:
            body[key] = value
    return body


def run(
    sandbox_id: str,
    cmd: str | Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    stdin: str | None = None,
    timeout: float | None = None,
    tag: str | None = None,
    user: str | None = None,
) -> Call[ExecResult]:
    body = _exec_body(cmd, env, cwd, tag, timeout, user)
    if stdin is not None:
        body["stdin"] = stdin
    waits = _DEFAULT_EXEC_TIMEOUT_S if timeout is None else timeout
    return Call(
        "POST",
        _sandbox(sandbox_id, "/exec"),
        lambda response: ExecResult.from_json(parse_object(response)),
        json=body,
        read_timeout=waits + _EXEC_SLACK_S,
    )


def processes(sandbox_id: str) -> Call[list[JSONObject]]:
    return Call("GET", _sandbox(sandbox_id, "/processes"), _items)


def _object_or_none(response: httpx.Response) -> JSONObject | None:
    parse_empty(response)
    return parse_object(response) if response.content else None


def signal_process(sandbox_id: str, ref: int | str, signal: int) -> Call[JSONObject | None]:
    path = _sandbox(sandbox_id, f"/processes/{_segment(str(ref))}/signal")
    return Call("POST", path, _object_or_none, json={"signal": int(signal)})


def port_url(
    sandbox_id: str, port: int, *, path: str = "/", expires_in: float = 3600.0
) -> Call[str]:
    # Not under `/ports/{port}/`, where every path belongs to the sandbox's own server.
    body = {"port": int(port), "path": path, "expires_in_s": expires_in}
    return Call(
        "POST",
        _sandbox(sandbox_id, "/urls"),
        lambda response: str(parse_object(response)["url"]),
        json=body,
    )


# --- files -----------------------------------------------------------------------------


def _items(response: httpx.Response) -> list[JSONObject]:
    return list(parse_object(response).get("items") or [])


def _bytes(response: httpx.Response) -> bytes:
    parse_empty(response)
    return response.content


def list_files(sandbox_id: str, path: str = ".", depth: int = 1) -> Call[list[JSONObject]]:
    params: Params = {"path": path, "depth": depth}
    return Call("GET", _sandbox(sandbox_id, "/files"), _items, params=params)


def stat_file(sandbox_id: str, path: str) -> Call[JSONObject]:
    return Call("GET", _sandbox(sandbox_id, "/files/stat"), parse_object, params={"path": path})


def read_file(sandbox_id: str, path: str) -> Call[bytes]:
    return Call("GET", _sandbox(sandbox_id, "/files/content"), _bytes, params={"path": path})


def make_directory(sandbox_id: str, path: str) -> Call[JSONObject]:
    return Call("POST", _sandbox(sandbox_id, "/files/mkdir"), parse_object, json={"path": path})


def move_file(sandbox_id: str, source: str, target: str) -> Call[JSONObject]:
    body = {"source": source, "target": target}
    return Call("POST", _sandbox(sandbox_id, "/files/move"), parse_object, json=body)


def delete_file(sandbox_id: str, path: str) -> Call[None]:
    return Call("DELETE", _sandbox(sandbox_id, "/files"), parse_empty, params={"path": path})


@dataclass(frozen=True, slots=True)
class Upload:
    """A call whose body is raw bytes rather than JSON (`Call` carries JSON only)."""

    call: Call[JSONObject]
    content: bytes

    def request(self, client: Client | AsyncClient) -> httpx.Request:
        """The request `client._send` would make for `call`, with the bytes as its body."""
        call = self.call
        return client._http.build_request(
            call.method,
            call.path,
            params=call.params,
            content=self.content,
            headers=client._headers(call),
            timeout=timeout_for(call, client._timeout),
        )


def write_file(sandbox_id: str, path: str, data: bytes | str, mode: int = 0o644) -> Upload:
    content = data.encode() if isinstance(data, str) else bytes(data)
    params: Params = {"path": path, "mode": mode}
    call = Call("PUT", _sandbox(sandbox_id, "/files/content"), parse_object, params=params)
    return Upload(call, content)


# --- the exec and attach WebSockets ----------------------------------------------------


def auth_headers(config: ClientConfig) -> dict[str, str]:
    return {"Authorization": f"Bearer {config.require_api_key()}"}


def _ws_url(base_url: str, path: str) -> str:
    url = httpx.URL(base_url)
    scheme = {"http": "ws", "https": "wss"}.get(url.scheme, url.scheme)
    prefix = url.raw_path.decode("ascii").split("?")[0].rstrip("/")
    return str(url.copy_with(scheme=scheme, raw_path=(prefix + path).encode("ascii")))


def exec_url(base_url: str, sandbox_id: str) -> str:
    return _ws_url(base_url, _sandbox(sandbox_id, "/exec"))


def attach_url(base_url: str, sandbox_id: str, ref: int | str) -> str:
    return _ws_url(base_url, _sandbox(sandbox_id, f"/processes/{_segment(str(ref))}"))


def watch_url(base_url: str, sandbox_id: str, path: str, recursive: bool) -> str:
    query = urlencode({"path": path, "recursive": "true" if recursive else "false"})
    return _ws_url(base_url, _sandbox(sandbox_id, "/files/watch")) + "?" + query


def watch_event(raw: str | bytes, url: str) -> JSONObject | None:
    """One message of a directory watch: a change, or None once the watch ended (its
    directory went). Raises the API's error for a refusal."""
    try:
        message = json.loads(raw)
    except ValueError:
        message = None
    if not isinstance(message, dict):
        raise TreadleConnectionError(f"unexpected frame on the watch: {raw!r:.200}", url=url)
    if "error" in message:
        raise _ws_error(message)
    if "end" in message:
        return None
    return message


def _encode(message: JSONObject) -> str:
    return json.dumps(message, separators=(",", ":"))


def _b64(data: bytes | str) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode("ascii")


def stdin_message(data: bytes | str, *, eof: bool = False) -> str:
    message: JSONObject = {"stdin": _b64(data)}
    if eof:
        message["eof"] = True
    return _encode(message)


def eof_message() -> str:
    return _encode({"eof": True})


def signal_message(signal: int) -> str:
    return _encode({"signal": int(signal)})


def resize_message(rows: int, cols: int) -> str:
    return _encode({"resize": {"rows": int(rows), "cols": int(cols)}})


def opening_messages(
    cmd: str | Sequence[str],
    *,
    stdin: bool | bytes | str = False,
    pty: tuple[int, int] | bool | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    tag: str | None = None,
    timeout: float | None = None,
    user: str | None = None,
) -> list[str]:
    """What the client sends first on the exec WebSocket: the process, then its stdin.

    `stdin` False closes the process's stdin at once, True leaves it open for `write()`,
    bytes or text are written and then closed. With a `pty` the terminal's input stays open
    unless data was given (a closed terminal input reads as Ctrl-D). `pty` is the
    terminal's `(rows, cols)`, True for 24x80; None or False for pipes."""
    start = _exec_body(cmd, env, cwd, tag, timeout, user)
    if pty is True:
        pty = DEFAULT_PTY_SIZE
    if pty is False:
        pty = None
    if pty is not None:
        rows, cols = pty
        start["pty"] = {"rows": int(rows), "cols": int(cols)}
    messages = [_encode(start)]
    if isinstance(stdin, bytes | bytearray | memoryview | str):
        messages.append(stdin_message(bytes(stdin) if not isinstance(stdin, str) else stdin))
        messages.append(eof_message())
    elif stdin is False and pty is None:
        messages.append(eof_message())
    return messages


def _ws_error(body: Mapping[str, Any]) -> TreadleAPIError:
    error = body.get("error")
    code = str(error.get("code") or "") if isinstance(error, dict) else ""
    return api_error(_STATUS_BY_CODE.get(code, 400), json.dumps(body).encode())


class ProcessStream:
    """A process seen through the exec or attach WebSocket: what its messages mean.

    The handles only send and receive; `feed` takes each server message in turn, and
    everything else (pid and tag, output read but not yet handed out, how the process
    ended, the result) is kept here.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.pid: int | None = None
        self.tag: str | None = None
        self.started = False
        self.ended: JSONObject | None = None
        self.pending: deque[Chunk] = deque()
        self._kept: dict[Channel, bytearray] = {"stdout": bytearray(), "stderr": bytearray()}
        self._result: ExecResult | None = None

    @property
    def opened(self) -> bool:
        """The process is known to have started (or ended, or written something)."""
        return self.started or self.ended is not None or bool(self.pending)

    def feed(self, raw: str | bytes) -> None:
        """Take one server message; raises the error it carries."""
        try:
            message = json.loads(raw)
        except ValueError:
            message = None
        if not isinstance(message, dict):
            raise self.broken(f"unexpected message {raw!r:.200}")
        for channel in _CHANNELS:
            data = message.get(channel)
            if isinstance(data, str):
                try:
                    self.pending.append((channel, base64.b64decode(data, validate=True)))
                except ValueError:
                    raise self.broken(f"undecodable {channel} message") from None
                return
        if isinstance(message.get("started"), dict):
            info = message["started"]
            self.started = True
            self.pid = info.get("pid") if isinstance(info.get("pid"), int) else None
            self.tag = info.get("tag") if isinstance(info.get("tag"), str) else None
        elif isinstance(message.get("exit"), dict):
            self.ended = dict(message["exit"])
        elif "error" in message:
            raise _ws_error(message)
        # Anything else is a message kind this client does not know yet: ignored.

    @property
    def wants_more(self) -> bool:
        """Nothing is waiting to be handed out and the process has not ended."""
        return not self.pending and self.ended is None

    def next_chunk(self) -> Chunk | None:
        """The next chunk read; None once the process ended and all was handed out."""
        return self.pending.popleft() if self.pending else None

    def keep(self, chunk: Chunk) -> None:
        """Keep a chunk for the result (what `wait()` reads rather than hands out)."""
        self._kept[chunk[0]].extend(chunk[1])

    def finish(self) -> ExecResult:
        """The result, once the process ended: its exit and the output kept."""
        if self._result is None:
            ended = self.ended or {}
            self._result = ExecResult(
                exit_code=ended.get("exit_code"),
                signal=ended.get("signal"),
                error=ended.get("error"),
                timed_out=bool(ended.get("timed_out", False)),
                stdout=self._kept["stdout"].decode(errors="replace"),
                stderr=self._kept["stderr"].decode(errors="replace"),
                pid=self.pid,
                tag=self.tag,
            )
        return self._result

    def read_error(self, exc: Exception) -> TreadleClientError:
        """Translate what reading or sending raised; a close before `exit` breaks the stream."""
        if isinstance(exc, ConnectionClosed):
            received = exc.rcvd
            reason = "" if received is None else f" (close code {received.code})"
            return self.broken(f"closed before the process ended{reason}")
        return stream_error(self.url, exc)

    def send_error(self, exc: Exception) -> TreadleClientError | None:
        """Translate what sending raised; None for a closed stream, which the next read
        explains (the process ended, or the stream broke off)."""
        return None if isinstance(exc, ConnectionClosed) else stream_error(self.url, exc)

    def broken(self, what: str) -> TreadleConnectionError:
        return TreadleConnectionError(f"the process stream from {self.url}: {what}", url=self.url)


# --- what the sync and the async classes share -----------------------------------------

ClientT = TypeVar("ClientT")
ConnectionT = TypeVar("ConnectionT")


class SandboxBase(Generic[ClientT]):
    """A sandbox's id, its client and what was last seen of it; the I/O is the subclass's."""

    def __init__(
        self,
        sandbox_id: str,
        *,
        client: ClientT,
        info: JSONObject | None = None,
        owns_client: bool = False,
    ) -> None:
        self.id = sandbox_id
        self._client = client
        self._owns_client = owns_client
        self._info: JSONObject = dict(info) if info is not None else {"id": sandbox_id}

    @property
    def info(self) -> JSONObject:
        """The sandbox as last seen (create, connect, `refresh()` or any state change)."""
        return self._info

    @property
    def status(self) -> str | None:
        return self._info.get("status")

    def _seen(self, info: JSONObject) -> JSONObject:
        self._info = info
        return info

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.id!r}, status={self.status!r})"


class ProcessBase(Generic[ConnectionT]):
    """A process handle's WebSocket and `ProcessStream`; the I/O is the subclass's."""

    def __init__(self, websocket: ConnectionT, stream: ProcessStream) -> None:
        self._websocket = websocket
        self._stream = stream

    @property
    def pid(self) -> int | None:
        """Its pid in the sandbox (None from a server that does not say it)."""
        return self._stream.pid

    @property
    def tag(self) -> str | None:
        return self._stream.tag

    @property
    def result(self) -> ExecResult | None:
        """How it ended, once `wait()` or iteration saw it end."""
        return self._stream.finish() if self._stream.ended is not None else None
