"""The viewer's side of an RFB (VNC) stream (RFC 6143), read as it passes, to keep a
view-only viewer's input from the screen.

Only what the viewer sends is read; the server's side (the tenant's) is passed on as it is.
The viewer's messages are framed here one by one: its opening (protocol version, chosen
security type, ClientInit), then its messages by type. A view-only viewer's key, pointer,
clipboard and resize messages are dropped; everything else goes on unchanged, but for the
ClientInit, which always asks to share the screen, so that no viewer can push the others
off. A message of a type this does not know cannot be framed: the stream is refused
(`ValueError`), never passed on half-read.
"""

from __future__ import annotations

import re
import struct

__all__ = ["MAX_MESSAGE", "ClientFilter"]

# RFB's version, exactly: "RFB 003.008\n". Servers read it with a looser scanf.
_VERSION = re.compile(rb"RFB 003\.(\d{3})\n")

_MAX_CUT_TEXT = 1 << 20
# The largest message a viewer sends (clipboard text and its header); a WebSocket message
# longer than this is not a viewer's.
MAX_MESSAGE = _MAX_CUT_TEXT + 8
_SECURITY_NONE = 1

# Client messages by type: (fixed size, or None where the size is read from the message).
_SET_PIXEL_FORMAT, _SET_ENCODINGS, _UPDATE_REQUEST = 0, 2, 3
_KEY, _POINTER, _CUT_TEXT = 4, 5, 6
_CONTINUOUS_UPDATES, _SET_DESKTOP_SIZE, _FENCE, _XVP, _QEMU = 150, 251, 248, 250, 255
_FIXED = {
    _SET_PIXEL_FORMAT: 20,
    _UPDATE_REQUEST: 10,
    _KEY: 8,
    _POINTER: 6,
    _CONTINUOUS_UPDATES: 10,
    _XVP: 4,
    _QEMU: 12,  # QEMU's extended key event, the only QEMU message a viewer sends
}
# What a view-only viewer may not send: input, the clipboard, the screen's size.
_INPUT = frozenset({_KEY, _POINTER, _CUT_TEXT, _SET_DESKTOP_SIZE, _QEMU, _XVP})


class ClientFilter:
    """Feed it what the viewer sent (`feed`), in order; it gives back what may go on to the
    server."""

    def __init__(self, *, view_only: bool) -> None:
        self.view_only = view_only
        self._buffer = bytearray()
        self._at = 0  # how much of `_buffer` is read
        self._stage = "version"  # then "security", "init", "messages"

    def feed(self, data: bytes) -> bytes:
        self._buffer += data
        out = bytearray()
        try:
            while True:
                taken = self._next()
                if taken is None:
                    return bytes(out)
                out += taken
        finally:
            # Drop what was read at once, not message by message: a megabyte of small
            # messages stays one pass over it.
            del self._buffer[: self._at]
            self._at = 0

    def _left(self) -> int:
        return len(self._buffer) - self._at

    def _next(self) -> bytes | None:
        """The next whole unit of the viewer's, as it may go on (b"" to drop it); None until
        it has come whole."""
        if self._stage == "version":
            if self._left() < 12:
                return None
            found = _VERSION.fullmatch(self._take(12))
            if found is None:
                raise ValueError("not an RFB protocol version")
            # What the server reads is what was decided here, never the viewer's own bytes
            # (a server that parses "003.+08" as 8 would otherwise frame the rest apart).
            if int(found.group(1)) >= 7:
                self._stage = "security"
                return b"RFB 003.008\n"
            self._stage = "init"
            return b"RFB 003.003\n"
        if self._stage == "security":
            if self._left() < 1:
                return None
            if self._take(1) != bytes([_SECURITY_NONE]):
                # The server inside the sandbox asks for none; Weaver is the gate.
                raise ValueError("a security type other than none")
            self._stage = "init"
            return bytes([_SECURITY_NONE])
        if self._stage == "init":
            if self._left() < 1:
                return None
            self._take(1)
            self._stage = "messages"
            return b"\x01"  # shared, whatever the viewer asked
        if self._left() < 1:
            return None
        kind = self._buffer[self._at]
        size = self._size(kind)
        if size is None or self._left() < size:
            return None
        message = self._take(size)
        if self.view_only and kind in _INPUT:
            return b""
        return message

    def _size(self, kind: int) -> int | None:
        buffer, at, left = self._buffer, self._at, self._left()
        if kind in _FIXED:
            return _FIXED[kind]
        if kind == _SET_ENCODINGS:
            if left < 4:
                return None
            count: int = struct.unpack_from(">H", buffer, at + 2)[0]
            return 4 + 4 * count
        if kind == _CUT_TEXT:
            if left < 8:
                return None
            length: int = abs(struct.unpack_from(">i", buffer, at + 4)[0])
            if length > _MAX_CUT_TEXT:
                raise ValueError("clipboard text over 1 MiB")
            return 8 + length
        if kind == _SET_DESKTOP_SIZE:
            if left < 8:
                return None
            return 8 + 16 * buffer[at + 6]
        if kind == _FENCE:
            if left < 9:
                return None
            fence = buffer[at + 8]
            if fence > 64:
                raise ValueError("a fence's payload is at most 64 bytes")
            return 9 + fence
        raise ValueError(f"an RFB client message of unknown type {kind}")

    def _take(self, size: int) -> bytes:
        taken = bytes(self._buffer[self._at : self._at + size])
        self._at += size
        return taken
