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


def test_headers_up_to_the_limit_and_refused_from_the_prefix_past_it() -> None:
    listing = {"ev": "result", "req": 2, "value": [{"name": "f" * 200}] * 2000}
    assert len(json.dumps(listing)) <= MAX_HEADER_BYTES  # the agent's largest answer
    assert FrameReader().feed(frame(listing))[0][0].ev == "result"
    # Refused from the 8-byte prefix alone: nothing of it is buffered or parsed.
    with pytest.raises(GuestProtocolError, match="too large"):
        FrameReader().feed(struct.pack(">II", MAX_HEADER_BYTES + 1, 0))


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


def test_output_and_data_frames_always_carry_bytes() -> None:
    # Empty ones would cost nothing against a window: a guest could queue them for ever.
    for header in ({"ev": "out", "pid": 1, "stream": "stdout"}, {"ev": "data", "req": 1}):
        with pytest.raises(GuestProtocolError, match="without bytes"):
            FrameReader().feed(frame(header))


def test_error_names_are_errno_names() -> None:
    ok = FrameReader().feed(frame({"ev": "error", "req": 1, "errno": "ENOENT"}))
    assert ok[0][0].errno == "ENOENT"  # type: ignore[union-attr]
    for name in ("errorcode", "E", "enoent", "E" + "X" * 31):
        with pytest.raises(GuestProtocolError):
            FrameReader().feed(frame({"ev": "error", "req": 1, "errno": name}))


def test_a_payload_on_an_event_that_carries_none_is_refused() -> None:
    assert FrameReader().feed(frame({"ev": "out", "pid": 1, "stream": "stderr"}, b"ok"))
    with pytest.raises(GuestProtocolError, match="payload"):
        FrameReader().feed(frame({"ev": "exit", "pid": 1, "code": 0}, b"smuggled"))
