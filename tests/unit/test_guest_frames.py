"""What Shuttle accepts from a guest agent, which the sandbox's code may have replaced: each
limit, and one past it."""

from __future__ import annotations

import json
import struct

import pytest

from treadle.protocol.guest import (
    MAX_HEADER_BYTES,
    MAX_PAYLOAD_BYTES,
    Data,
    Exit,
    FrameReader,
    GuestProtocolError,
    Out,
    Result,
)
from treadle.protocol.limits import MAX_JSON_DEPTH


def frame(header: object, payload: bytes = b"", *, raw: bytes | None = None) -> bytes:
    head = raw if raw is not None else json.dumps(header).encode()
    return struct.pack(">II", len(head), len(payload)) + head + payload


def test_frames_split_anywhere_are_put_back_together() -> None:
    stream = frame({"ev": "out", "pid": 1, "stream": "stdout"}, b"hello") + frame(
        {"ev": "exit", "pid": 1, "code": 0}
    )
    reader = FrameReader()
    got = []
    for byte in stream:
        got += reader.feed(bytes([byte]))
    assert got == [
        (Out(ev="out", pid=1, stream="stdout"), b"hello"),
        (Exit(ev="exit", pid=1, code=0), b""),
    ]


def test_payload_up_to_the_limit_and_not_one_byte_more() -> None:
    header = {"ev": "data", "req": 1}
    ok = FrameReader().feed(frame(header, b"x" * MAX_PAYLOAD_BYTES))
    assert ok == [(Data(ev="data", req=1), b"x" * MAX_PAYLOAD_BYTES)]
    # Refused from the length alone, before any of it is buffered.
    with pytest.raises(GuestProtocolError, match="too large"):
        FrameReader().feed(struct.pack(">II", 20, MAX_PAYLOAD_BYTES + 1))


def test_headers_past_their_size_are_refused_but_a_large_listing_is_not() -> None:
    padding = "p" * (MAX_HEADER_BYTES - 60)
    ok = {"ev": "exit", "pid": 1, "code": 0, "x": padding}
    assert len(json.dumps(ok)) <= MAX_HEADER_BYTES
    assert FrameReader().feed(frame(ok))[0][0] == Exit(ev="exit", pid=1, code=0)
    with pytest.raises(GuestProtocolError, match="header of"):
        FrameReader().feed(frame({**ok, "x": padding + "p" * 100}))
    listing = {"ev": "result", "req": 2, "value": [{"name": "f" * 100}] * 2000}
    assert FrameReader().feed(frame(listing))[0][0].ev == "result"


def nested(depth: int) -> object:
    value: object = 0
    for _ in range(depth):
        value = [value]
    return value


def test_json_nesting_up_to_the_limit_and_not_one_level_more() -> None:
    # The header object itself is one level.
    ok = {"ev": "result", "req": 1, "value": nested(MAX_JSON_DEPTH - 1)}
    assert isinstance(FrameReader().feed(frame(ok))[0][0], Result)
    with pytest.raises(GuestProtocolError, match="deeper"):
        FrameReader().feed(frame({**ok, "value": nested(MAX_JSON_DEPTH)}))
    with pytest.raises(GuestProtocolError, match="not JSON"):
        FrameReader().feed(frame(None, raw=b"[" * 100_000))


@pytest.mark.parametrize(
    "raw",
    [
        b'{"ev":"result","req":1,"value":NaN}',
        b'{"ev":"result","req":1,"value":Infinity}',
        b'{"ev":"exit","pid":1,"code":256}',
        b'{"ev":"exit","pid":0,"code":1}',
        b'{"ev":"exit","pid":2147483648,"code":1}',
        b'{"ev":"out","pid":1,"stream":"stdin"}',
        b'{"ev":"launch-missiles"}',
        b'["ev","ready"]',
        b"not json",
        b'{"ev":"error","req":1,"errno":"' + b"E" * 33 + b'"}',
    ],
)
def test_malformed_events_are_refused(raw: bytes) -> None:
    with pytest.raises(GuestProtocolError):
        FrameReader().feed(frame(None, raw=raw))


def test_a_payload_on_an_event_that_carries_none_is_refused() -> None:
    assert FrameReader().feed(frame({"ev": "out", "pid": 1, "stream": "stderr"}, b"ok"))
    with pytest.raises(GuestProtocolError, match="payload"):
        FrameReader().feed(frame({"ev": "exit", "pid": 1, "code": 0}, b"smuggled"))
