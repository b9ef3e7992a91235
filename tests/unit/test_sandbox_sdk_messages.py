"""What the sandbox SDK puts on the wire and makes of what comes back, without a server."""

from __future__ import annotations

import base64
import json
import subprocess
import sys

import httpx
import pytest

from treadle.cli.sandboxes import exit_code_of, split_location
from treadle.client import ExecResult, Sandbox, TreadleAPIError, TreadleConnectionError
from treadle.client import _sandbox_api as sapi
from treadle.client._sync import Client


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_opening_messages_say_the_process_then_its_stdin() -> None:
    closed = [json.loads(m) for m in sapi.opening_messages(["cat"], tag="t", timeout=5)]
    assert closed == [{"cmd": ["cat"], "tag": "t", "timeout_s": 5}, {"eof": True}]
    given = [json.loads(m) for m in sapi.opening_messages("cat", stdin=b"\x00\xff")]
    assert given == [{"cmd": "cat"}, {"stdin": b64(b"\x00\xff")}, {"eof": True}]
    # A terminal's input stays open (closing it would read as Ctrl-D); True keeps it open.
    terminal = [json.loads(m) for m in sapi.opening_messages("sh", pty=True)]
    assert terminal == [{"cmd": "sh", "pty": {"rows": 24, "cols": 80}}]
    kept = sapi.opening_messages(["sh"], stdin=True, env={"A": "1"}, cwd="/tmp")
    assert [json.loads(m) for m in kept] == [{"cmd": ["sh"], "env": {"A": "1"}, "cwd": "/tmp"}]


def test_control_messages() -> None:
    assert json.loads(sapi.stdin_message("é", eof=True)) == {
        "stdin": b64("é".encode()),
        "eof": True,
    }
    assert json.loads(sapi.signal_message(15)) == {"signal": 15}
    assert json.loads(sapi.resize_message(40, 120)) == {"resize": {"rows": 40, "cols": 120}}


def test_a_stream_keeps_pid_output_and_exit() -> None:
    stream = sapi.ProcessStream("ws://x")
    assert not stream.opened
    stream.feed(json.dumps({"started": {"pid": 42, "tag": "srv"}}))
    assert (stream.opened, stream.pid, stream.tag) == (True, 42, "srv")
    stream.feed(json.dumps({"stdout": b64(b"out")}))
    stream.feed(json.dumps({"stderr": b64(b"\xff")}))
    stream.feed(json.dumps({"novel": 1}))  # a kind this client does not know: ignored
    assert stream.next_chunk() == ("stdout", b"out")
    assert stream.wants_more is False
    stream.keep(("stderr", b"\xff"))
    stream.feed(json.dumps({"exit": {"exit_code": None, "signal": 9, "error": None}}))
    result = stream.finish()
    assert result == ExecResult(exit_code=None, signal=9, stderr="\ufffd", pid=42, tag="srv")
    assert not result.ok and stream.finish() is result


@pytest.mark.parametrize(
    ("code", "status"),
    [("invalid_transition", 409), ("not_found", 404), ("invalid_request", 422), ("odd", 400)],
)
def test_an_error_on_the_stream_is_an_api_error(code: str, status: int) -> None:
    stream = sapi.ProcessStream("ws://x")
    body = {"error": {"code": code, "message": "no", "details": {"id": "sbx_1"}}}
    with pytest.raises(TreadleAPIError) as raised:
        stream.feed(json.dumps(body))
    assert (raised.value.status, raised.value.code, raised.value.details) == (
        status,
        code,
        {"id": "sbx_1"},
    )


@pytest.mark.parametrize("raw", ["not json", "[1]", json.dumps({"stdout": "!!"})])
def test_garbage_on_the_stream_breaks_it(raw: str) -> None:
    with pytest.raises(TreadleConnectionError):
        sapi.ProcessStream("ws://x").feed(raw)


def test_requests_on_the_wire() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.path.endswith("/urls"):
            return httpx.Response(200, json={"url": "http://signed", "expires_at": "x"})
        if request.url.path.endswith("/files/content"):
            return httpx.Response(200, json={"path": "a", "size": 2})
        return httpx.Response(200, json={"id": "sbx_1", "status": "pending", "items": []})

    client = Client("http://treadle.test/base", "tk_test", transport=httpx.MockTransport(handler))
    sbx = Sandbox.create(client=client, timeout=30, metadata={"k": "v"}, network=True)
    assert json.loads(seen[-1].content) == {
        "timeout_s": 30,
        "metadata": {"k": "v"},
        "network": True,
    }
    list(Sandbox.list(client=client, status=["running", "paused"], metadata={"a": "b"}))
    assert seen[-1].url.query == b"limit=100&status=running&status=paused&metadata=a%3Ab"
    sbx.files.write("a", b"\x00\x01", mode=0o600)
    assert (seen[-1].method, seen[-1].content, seen[-1].url.params["mode"]) == (
        "PUT",
        b"\x00\x01",
        "384",
    )
    assert sbx.url(8080, path="/x", expires_in=60) == "http://signed"
    assert json.loads(seen[-1].content) == {"port": 8080, "path": "/x", "expires_in_s": 60}
    assert (
        sapi.exec_url(client.config.url, "sbx_1")
        == "ws://treadle.test/base/v1/sandboxes/sbx_1/exec"
    )
    assert (
        sapi.attach_url("https://h", "sbx_1", "a/b") == "wss://h/v1/sandboxes/sbx_1/processes/a%2Fb"
    )
    client.close()


@pytest.mark.parametrize(
    ("result", "code"),
    [
        (ExecResult(exit_code=0), 0),
        (ExecResult(exit_code=3), 3),
        (ExecResult(exit_code=None, signal=15), 143),
        (ExecResult(exit_code=None, signal=9, timed_out=True), 124),
        (ExecResult(exit_code=None, error="cannot start"), 1),
    ],
)
def test_cli_exit_codes(result: ExecResult, code: int) -> None:
    assert exit_code_of(result) == code


def test_cp_locations() -> None:
    assert split_location("sbx_1:a/b") == ("sbx_1", "a/b")
    assert split_location("sbx_1:") == ("sbx_1", ".")
    assert split_location("./a:b") == (None, "./a:b")
    assert split_location("/tmp/x") == (None, "/tmp/x")
    assert split_location("-") == (None, "-")


def test_import_treadle_loads_no_http_client() -> None:
    probe = "import sys, treadle; print('httpx' in sys.modules, 'websockets' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout == "False False\n"
