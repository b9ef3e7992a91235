"""The viewer's side of a VNC stream as Weaver passes it on (`treadle.protocol.rfb`): a
view-only viewer's input never reaches the screen, a controlling viewer's arrives unchanged,
every viewer shares the screen, and what cannot be framed ends the stream."""

from __future__ import annotations

import struct

import pytest

from treadle.protocol.rfb import ClientFilter

OPENING = b"RFB 003.008\n" + b"\x01" + b"\x00"  # version, security none, exclusive access
SET_ENCODINGS = struct.pack(">BxHii", 2, 2, 0, -223)
UPDATE = struct.pack(">BBHHHH", 3, 1, 0, 0, 1280, 800)
KEY = struct.pack(">BBxxI", 4, 1, 0x61)
POINTER = struct.pack(">BBHH", 5, 1, 10, 20)
CUT = struct.pack(">BxxxI", 6, 5) + b"hello"
PIXEL_FORMAT = bytes([0, 0, 0, 0]) + bytes(16)


def feed_bytewise(screen: ClientFilter, data: bytes) -> bytes:
    return b"".join(screen.feed(data[i : i + 1]) for i in range(len(data)))


@pytest.mark.parametrize("pieces", ["whole", "bytewise"])
def test_a_view_only_viewer_watches_and_cannot_touch(pieces: str) -> None:
    stream = OPENING + SET_ENCODINGS + KEY + UPDATE + POINTER + CUT + PIXEL_FORMAT + UPDATE
    screen = ClientFilter(view_only=True)
    passed = screen.feed(stream) if pieces == "whole" else feed_bytewise(screen, stream)
    # Shared, whatever it asked; its updates asked for; its input gone.
    assert passed == b"RFB 003.008\n\x01\x01" + SET_ENCODINGS + UPDATE + PIXEL_FORMAT + UPDATE


def test_a_controlling_viewer_s_input_goes_on_unchanged() -> None:
    screen = ClientFilter(view_only=False)
    stream = OPENING + KEY + POINTER + CUT + UPDATE
    assert screen.feed(stream) == b"RFB 003.008\n\x01\x01" + KEY + POINTER + CUT + UPDATE


def test_the_old_protocol_has_no_security_choice() -> None:
    screen = ClientFilter(view_only=True)
    assert screen.feed(b"RFB 003.003\n\x00" + KEY + UPDATE) == b"RFB 003.003\n\x01" + UPDATE


@pytest.mark.parametrize(
    "stream",
    [
        b"GET / HTTP/1.1\r\n",  # not RFB
        b"RFB 003.008\n\x02",  # VNC authentication: the server in the sandbox asks for none
        OPENING + b"\x07" + bytes(20),  # a message of an unknown type
        OPENING + struct.pack(">BxxxI", 6, 2 << 20),  # 2 MiB of clipboard
        OPENING + struct.pack(">BxxxI", 6, 0x80000000),  # a length with the sign bit
    ],
)
def test_what_cannot_be_framed_ends_the_stream(stream: bytes) -> None:
    with pytest.raises(ValueError):
        ClientFilter(view_only=False).feed(stream)


def test_a_message_that_has_not_come_whole_waits() -> None:
    screen = ClientFilter(view_only=False)
    assert screen.feed(OPENING + POINTER[:3]) == b"RFB 003.008\n\x01\x01"
    assert screen.feed(POINTER[3:]) == POINTER


@pytest.mark.parametrize("minor", [b"+08", b" 08", b"08x", b"0x8", b"-08", b"\xd9\xa8\xd9"])
def test_only_an_exact_version_opens_the_stream(minor: bytes) -> None:
    # A server that reads "003.+08" as 3.8 would frame what follows apart from the filter,
    # and a view-only viewer's input would slip through as part of another message.
    with pytest.raises(ValueError):
        ClientFilter(view_only=True).feed(b"RFB 003." + minor + b"\n\x01")


def test_the_server_reads_the_version_the_filter_decided() -> None:
    screen = ClientFilter(view_only=True)
    assert screen.feed(b"RFB 003.889\n\x01\x00") == b"RFB 003.008\n\x01\x01"
    old = ClientFilter(view_only=True)
    assert old.feed(b"RFB 003.005\n\x00" + KEY) == b"RFB 003.003\n\x01"


def test_a_megabyte_of_small_messages_is_framed_whole() -> None:
    stream = OPENING + POINTER * ((1 << 20) // len(POINTER)) + UPDATE
    assert ClientFilter(view_only=True).feed(stream) == b"RFB 003.008\n\x01\x01" + UPDATE
    assert ClientFilter(view_only=False).feed(stream) == stream[:12] + b"\x01\x01" + stream[14:]
