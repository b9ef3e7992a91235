"""envd's plain HTTP `/files`: `GET` downloads a file, `POST` uploads one or more (a
`multipart/form-data` body whose parts are named `file`, each part's filename its path unless
`path` is given; or a raw `application/octet-stream` body to `path`), creating parent
directories and replacing what is there. Both stream, at the sandbox's pace, as treadle's own
files routes do, and are done by the sandbox's guest agent as the caller's user.

Access: the sandbox's access token (`X-Access-Token`), or a URL signed with it (`signature`
and `signature_expiration`, as the SDK's `download_url` and `upload_url` make them). Errors are
envd's: `{"code": <status>, "message"}`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import AsyncIterator
from typing import Any

from connectrpc.errors import ConnectError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from treadle.domain.errors import TreadleError
from treadle.weaver.api.e2b.views import treadle_id
from treadle.weaver.api.errors import status_for
from treadle.weaver.api.sandbox_errors import sandbox_error
from treadle.weaver.api.sandbox_files import (
    check_quota,
    disk_quota_mib,
    read_through,
    write_through,
)
from treadle.weaver.core import Weaver
from treadle.weaver.envd.access import SANDBOX_HEADER, TOKEN_HEADER, Denied, EnvdCaller, authorize
from treadle.weaver.envd.errors import HTTP_STATUS
from treadle.weaver.envd.filesystem import open_file_stream
from treadle.weaver.services.streams import Ended, ExecStream

__all__ = ["files", "signature"]

_PATH_MAX = 4096
_MAX_PARTS = 1000
# Seconds since the epoch: 12 digits last until the year 33658.
_EXPIRY_DIGITS = 12


class _Failed(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def signature(path: str, operation: str, user: str | None, token: str, expires: int | None) -> str:
    """How the SDK signs a file URL with the sandbox's access token."""
    raw = f"{path}:{operation}:{user or ''}:{token}" + ("" if expires is None else f":{expires}")
    return "v1_" + base64.b64encode(hashlib.sha256(raw.encode()).digest()).decode().rstrip("=")


def _error(status: int, message: str) -> Response:
    return JSONResponse({"code": status, "message": message}, status_code=status)


async def files(weaver: Weaver, request: Request) -> Response:
    query = request.query_params
    path = query.get("path")
    user = query.get("username") or None
    try:
        caller = await _caller(weaver, request, path, user)
        if request.method == "GET":
            return await _download(weaver, caller, _checked_path(path))
        if request.method == "POST":
            return await _upload(weaver, caller, request, path)
        return _error(405, "only GET and POST")
    except Denied as exc:
        return _error(exc.status, exc.message)
    except _Failed as exc:
        return _error(exc.status, exc.message)
    except TreadleError as exc:
        return _error(status_for(exc), str(exc))
    except ConnectError as exc:  # from the file operations shared with the Connect services
        return _error(HTTP_STATUS.get(exc.code, 400), exc.message)


async def _caller(
    weaver: Weaver, request: Request, path: str | None, user: str | None
) -> EnvdCaller:
    headers = dict(request.headers)
    given = request.query_params.get("signature")
    if headers.get(TOKEN_HEADER) is None and given is not None:
        # A signed URL: the signature stands for the token, for this path, user and use.
        raw_expiry = request.query_params.get("signature_expiration") or None
        if raw_expiry is not None and not (
            len(raw_expiry) <= _EXPIRY_DIGITS and raw_expiry.isascii() and raw_expiry.isdigit()
        ):
            raise Denied(400, "signature_expiration is a Unix time in seconds")
        expires = None if raw_expiry is None else int(raw_expiry)
        if expires is not None and expires < time.time():
            raise Denied(401, "the signed URL has expired")
        try:
            row = await weaver.sandboxes.get(None, treadle_id(headers.get(SANDBOX_HEADER, "")))
        except TreadleError:
            raise Denied(401, "the signature does not open this sandbox") from None
        operation = "read" if request.method == "GET" else "write"
        wanted = signature(path or "", operation, user, row.access_token, expires)
        if not hmac.compare_digest(wanted.encode(), given.encode()):
            raise Denied(401, "the signature does not open this sandbox")
        headers[TOKEN_HEADER] = row.access_token
    return await authorize(weaver, headers, user)


def _checked_path(path: str | None) -> str:
    if not path or len(path) > _PATH_MAX or "\x00" in path:
        raise _Failed(400, "path is 1-4096 characters, without NUL")
    return path


def _refused(ended: Ended, path: str, quota: int | None = None) -> _Failed:
    exc = sandbox_error(ended, {"path": path}, quota)
    status = status_for(exc)
    if ended.error_code in ("ENOENT",):
        return _Failed(404, f"path '{path}' does not exist")
    if ended.error_code in ("EISDIR",):
        return _Failed(400, f"path '{path}' is a directory")
    return _Failed(400 if status == 422 else status, str(exc))


async def _download(weaver: Weaver, caller: EnvdCaller, path: str) -> Response:
    body = await read_through(await open_file_stream(weaver, caller, "read", path))
    if isinstance(body, Ended):
        raise _refused(body, path)
    return StreamingResponse(body, media_type="application/octet-stream")


async def _upload(
    weaver: Weaver, caller: EnvdCaller, request: Request, path: str | None
) -> Response:
    kind, options = parse_options_header(request.headers.get("content-type", ""))
    if kind == b"multipart/form-data":
        boundary = options.get(b"boundary")
        if not boundary:
            raise _Failed(400, "a multipart body needs its boundary")
        written = await _multipart(weaver, caller, request, path, boundary)
    else:
        target = _checked_path(path)
        await _write(weaver, caller, target, request.stream())
        written = [target]
    if not written:
        raise _Failed(400, "no file in the request (multipart parts are named 'file')")
    return JSONResponse(
        [{"name": p.rsplit("/", 1)[-1], "type": "file", "path": p} for p in written]
    )


async def _write(
    weaver: Weaver, caller: EnvdCaller, path: str, chunks: AsyncIterator[bytes]
) -> None:
    stream = await open_file_stream(weaver, caller, "write", path)
    quota = disk_quota_mib(caller.row)
    ended = await write_through(stream, chunks, path, quota)
    if ended.error is not None:
        raise _refused(ended, path, quota)


async def _multipart(
    weaver: Weaver, caller: EnvdCaller, request: Request, path: str | None, boundary: bytes
) -> list[str]:
    """Each part named `file` streamed to its path, one after another."""
    state: dict[str, Any] = {"field": b"", "value": b"", "headers": {}}
    pieces: list[tuple[str, Any]] = []  # what the parser saw in one chunk, in order

    def on_header_field(data: bytes, start: int, end: int) -> None:
        state["field"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        state["value"] += data[start:end]

    def on_header_end() -> None:
        state["headers"][state["field"].lower()] = state["value"]
        state["field"] = state["value"] = b""

    def on_headers_finished() -> None:
        pieces.append(("part", dict(state["headers"])))
        state["headers"] = {}

    def on_part_data(data: bytes, start: int, end: int) -> None:
        pieces.append(("data", bytes(data[start:end])))

    def on_part_end() -> None:
        pieces.append(("end", None))

    parser = MultipartParser(
        boundary,
        {
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_headers_finished": on_headers_finished,
            "on_part_data": on_part_data,
            "on_part_end": on_part_end,
        },
    )
    written: list[str] = []
    current: _Part | None = None
    try:
        async for chunk in request.stream():
            try:
                parser.write(chunk)
            except Exception as exc:  # the parser's errors: a malformed body
                raise _Failed(400, f"malformed multipart body: {exc}") from None
            for kind, value in pieces:
                if kind == "part":
                    current = await _Part.open(weaver, caller, value, path, len(written))
                elif kind == "data" and current is not None:
                    await current.write(value)
                elif kind == "end" and current is not None:
                    written += await current.close()
                    current = None
            pieces.clear()
    except BaseException:
        # A malformed body, a refusal or a client gone, inside a part: its stream is left.
        if current is not None:
            current.abandon()
        raise
    if current is not None:
        current.abandon()
        raise _Failed(400, "the multipart body ended inside a part")
    return written


class _Part:
    """One part of an upload: a `file` part streamed into the sandbox, anything else read
    and dropped."""

    def __init__(self, stream: ExecStream | None, path: str, quota: int | None) -> None:
        self.stream, self.path, self.quota, self.sent = stream, path, quota, 0

    @classmethod
    async def open(
        cls,
        weaver: Weaver,
        caller: EnvdCaller,
        headers: dict[bytes, bytes],
        path: str | None,
        count: int,
    ) -> _Part:
        _, options = parse_options_header(headers.get(b"content-disposition", b""))
        if options.get(b"name") != b"file":
            return cls(None, "", None)
        if count >= _MAX_PARTS:
            raise _Failed(400, f"at most {_MAX_PARTS} files in one upload")
        name = options.get(b"filename", b"").decode("utf-8", "replace")
        target = _checked_path(path or name)
        stream = await open_file_stream(weaver, caller, "write", target)
        return cls(stream, target, disk_quota_mib(caller.row))

    async def write(self, data: bytes) -> None:
        if self.stream is None or not data or self.stream.over:
            return
        self.sent += len(data)
        check_quota(self.path, self.sent, self.quota)  # `_multipart` leaves the stream then
        self.stream.write(data)
        await self.stream.drain()

    async def close(self) -> list[str]:
        if self.stream is None:
            return []
        self.stream.write(b"", eof=True)
        ended = await self.stream.wait()
        if ended.error is not None:
            raise _refused(ended, self.path, self.quota)
        return [self.path]

    def abandon(self) -> None:
        if self.stream is not None and self.stream.ended is None:
            self.stream.detach()
