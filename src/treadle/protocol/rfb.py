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

import struct

__all__ = ["ClientFilter"]

_MAX_CUT_TEXT = 1 << 20
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
        self._stage = "version"  # then "security", "init", "messages"
        self._version = 8

    def feed(self, data: bytes) -> bytes:
        self._buffer += data
        out = bytearray()
        while True:
            taken = self._next()
            if taken is None:
                return bytes(out)
            out += taken

    def _next(self) -> bytes | None:
        """The next whole unit of the viewer's, as it may go on (b"" to drop it); None until
        it has come whole."""
        buffer = self._buffer
        if self._stage == "version":
            if len(buffer) < 12:
                return None
            version = bytes(buffer[:12])
            if version[:4] != b"RFB " or version[7:8] != b"." or version[11:] != b"\n":
                raise ValueError("not an RFB protocol version")
            minor = int(version[8:11]) if version[8:11].isdigit() else -1
            self._version = 3 if minor < 7 else 8
            self._stage = "init" if self._version == 3 else "security"
            return self._take(12)
        if self._stage == "security":
            if len(buffer) < 1:
                return None
            if buffer[0] != _SECURITY_NONE:
                # The server inside the sandbox asks for none; Weaver is the gate.
                raise ValueError("a security type other than none")
            self._stage = "init"
            return self._take(1)
        if self._stage == "init":
            if len(buffer) < 1:
                return None
            self._take(1)
            self._stage = "messages"
            return b"\x01"  # shared, whatever the viewer asked
        if not buffer:
            return None
        kind = buffer[0]
        size = self._size(kind)
        if size is None or len(buffer) < size:
            return None
        message = self._take(size)
        if self.view_only and kind in _INPUT:
            return b""
        return message

    def _size(self, kind: int) -> int | None:
        buffer = self._buffer
        if kind in _FIXED:
            return _FIXED[kind]
        if kind == _SET_ENCODINGS:
            if len(buffer) < 4:
                return None
            count: int = struct.unpack_from(">H", buffer, 2)[0]
            return 4 + 4 * count
        if kind == _CUT_TEXT:
            if len(buffer) < 8:
                return None
            length: int = abs(
                struct.unpack_from(">i", buffer, 4)[0]
            )  # negative: the extended clipboard's format
            if length > _MAX_CUT_TEXT:
                raise ValueError("clipboard text over 1 MiB")
            return 8 + length
        if kind == _SET_DESKTOP_SIZE:
            if len(buffer) < 8:
                return None
            return 8 + 16 * buffer[6]
        if kind == _FENCE:
            if len(buffer) < 9:
                return None
            length = buffer[8]
            if length > 64:
                raise ValueError("a fence's payload is at most 64 bytes")
            return 9 + length
        raise ValueError(f"an RFB client message of unknown type {kind}")

    def _take(self, size: int) -> bytes:
        taken = bytes(self._buffer[:size])
        del self._buffer[:size]
        return taken
