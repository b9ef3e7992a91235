"""Turning API answers into results and errors, and what each call puts on the wire."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from treadle.client import (
    AsyncClient,
    Client,
    TreadleAPIError,
    TreadleConnectionError,
    _api,
)


def _client(status: int, body: bytes, content_type: str = "application/json") -> Client:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, content=body, headers={"content-type": content_type})

    return Client("http://treadle.test", "tk_test", transport=httpx.MockTransport(handler))


def test_error_body_becomes_api_error() -> None:
    details = [{"loc": ["body", "command"], "msg": "Field required"}]
    body = {"error": {"code": "validation_error", "message": "body.command", "details": details}}
    with pytest.raises(TreadleAPIError) as raised:
        _client(422, json.dumps(body).encode()).create_function({"name": "f"})
    error = raised.value
    assert (error.status, error.code, error.message) == (422, "validation_error", "body.command")
    assert error.details == details


def test_non_json_error_body_keeps_status_and_text() -> None:
    with pytest.raises(TreadleAPIError) as raised:
        _client(502, b"<html>Bad Gateway</html>", "text/html").list_functions()
    assert raised.value.status == 502
    assert raised.value.code == "server_error"
    assert "Bad Gateway" in raised.value.message


def test_json_error_without_envelope_uses_the_documented_code() -> None:
    with pytest.raises(TreadleAPIError) as raised:
        _client(404, b'{"detail": "Not Found"}').get_execution("ex_1")
    assert (raised.value.code, raised.value.message) == ("not_found", "Not Found")


def test_empty_error_body_uses_the_reason_phrase() -> None:
    with pytest.raises(TreadleAPIError) as raised:
        _client(409, b"").cancel("ex_1")
    assert (raised.value.code, raised.value.message) == ("conflict", "Conflict")


def test_success_that_is_not_a_json_object_is_an_error() -> None:
    with pytest.raises(TreadleAPIError, match="expected a JSON object"):
        _client(200, b"[1, 2]").healthz()


async def test_async_client_raises_the_same_error() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(403, json={"error": {"code": "forbidden", "message": "admin only"}})

    transport = httpx.MockTransport(handler)
    async with AsyncClient("http://treadle.test", "tk_test", transport=transport) as client:
        with pytest.raises(TreadleAPIError) as raised:
            await client.nodes()
    assert (raised.value.status, raised.value.code) == (403, "forbidden")


def test_handshake_rejection_parses_like_any_error() -> None:
    body = b'{"error": {"code": "unauthenticated", "message": "unknown API key"}}'
    error = _api.api_error(401, body, "Unauthorized")
    assert (error.status, error.code, error.message) == (401, "unauthenticated", "unknown API key")


@pytest.fixture
def refusing_url() -> Iterator[str]:
    # A bound socket that never listens refuses connections, and holding it keeps the
    # port from being reused by anything else while the test runs.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


def test_connection_refused_names_the_url_and_treadle_up(refusing_url: str) -> None:
    with Client(refusing_url, "tk_test") as client, pytest.raises(TreadleConnectionError) as raised:
        client.healthz()
    assert refusing_url in str(raised.value)
    assert "treadle up" in str(raised.value)


def test_follow_connection_refused_is_a_connection_error(refusing_url: str) -> None:
    with Client(refusing_url, "tk_test") as client, pytest.raises(TreadleConnectionError):
        next(client.follow("ex_1"))


def test_invoke_sends_only_given_fields_and_waits_longer_than_wait() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"id": "ex_1", "state": "success"})

    client = Client("http://treadle.test", "tk_test", transport=httpx.MockTransport(handler))
    client.invoke("add", {"x": 4}, wait=60, version=2)
    client.invoke("add", stdin="in", idempotency_key="k")
    first, second = seen
    assert first.url.path == "/v1/functions/add/invoke"
    assert dict(first.url.params) == {"wait": "60", "version": "2"}
    assert json.loads(first.content) == {"args": {"x": 4}}
    assert first.headers["authorization"] == "Bearer tk_test"
    read_timeout: Any = first.extensions["timeout"]["read"]
    assert read_timeout > 60
    assert json.loads(second.content) == {"args": {}, "stdin": "in", "idempotency_key": "k"}


def test_path_parameters_cannot_escape_their_segment() -> None:
    call = _api.get_execution("../nodes?x=1")
    assert call.path == "/v1/executions/..%2Fnodes%3Fx%3D1"


@pytest.mark.parametrize(
    ("base", "expected"),
    [
        ("http://h:8700", "ws://h:8700/v1/executions/ex_1/output?after_seq=7"),
        ("https://h/prefix/", "wss://h/prefix/v1/executions/ex_1/output?after_seq=7"),
    ],
)
def test_output_stream_url(base: str, expected: str) -> None:
    assert _api.output_stream_url(base, "ex_1", 7) == expected
