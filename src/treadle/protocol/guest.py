"""Frames between Shuttle and the guest agent inside a sandbox (`treadle.guest.agent`).

A frame is 8 bytes (the length of a JSON header and the length of a binary payload, unsigned
32-bit big-endian), the header, then the payload. Requests carry `op`, events carry `ev`.

The guest agent runs inside the boundary, where the tenant's code can replace it: everything
read from it is untrusted, held here to sizes, depth and types like a frame from the network.
A frame that breaks them is a `GuestProtocolError`, and the sandbox that sent it is ended.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from treadle.protocol.limits import INT32_MAX, check_json

__all__ = [
    "MAX_HEADER_BYTES",
    "MAX_PAYLOAD_BYTES",
    "Data",
    "Done",
    "Error",
    "Event",
    "Exit",
    "FrameReader",
    "GuestProtocolError",
    "Out",
    "Ready",
    "Result",
    "Size",
    "Started",
    "encode_request",
]

HEADER = struct.Struct(">II")
# What the agent sends is at most 256 KiB of payload, with a header that is short but for a
# directory listing (at most 2,000 entries, well under this). Both are checked from the
# 8-byte prefix, before anything is buffered or parsed: they bound what a hostile guest can
# make Shuttle hold and parse per frame.
MAX_HEADER_BYTES = 1024 * 1024
MAX_PAYLOAD_BYTES = 1024 * 1024


class GuestProtocolError(Exception):
    """The guest agent sent something that is not a valid frame."""


class _Event(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True, allow_inf_nan=False)


ProcessId = Annotated[int, Field(ge=1, le=INT32_MAX)]
RequestId = Annotated[int, Field(ge=1, le=INT32_MAX)]


class Ready(_Event):
    ev: Literal["ready"]
    pid: int = Field(ge=1, le=INT32_MAX)
    uid: int = Field(ge=0, le=INT32_MAX)
    # Whether it acts as other users of the sandbox when a request names one.
    users: bool = False


class Started(_Event):
    ev: Literal["started"]
    pid: ProcessId
    os_pid: int = Field(ge=1, le=INT32_MAX)


class Out(_Event):
    ev: Literal["out"]
    pid: ProcessId
    stream: Literal["stdout", "stderr"]


class Exit(_Event):
    ev: Literal["exit"]
    pid: ProcessId
    code: int | None = Field(default=None, ge=0, le=255)
    signal: int | None = Field(default=None, ge=1, le=64)


class Size(_Event):
    ev: Literal["size"]
    req: RequestId
    size: int = Field(ge=0, le=2**63 - 1)


class Data(_Event):
    ev: Literal["data"]
    req: RequestId


class Done(_Event):
    ev: Literal["done"]
    req: RequestId


class Result(_Event):
    ev: Literal["result"]
    req: RequestId
    value: Any = None


class Error(_Event):
    ev: Literal["error"]
    req: RequestId
    errno: str = Field(pattern=r"^E[A-Z0-9]{1,30}$")
    message: str | None = Field(default=None, max_length=4096)


Event = Annotated[
    Ready | Started | Out | Exit | Size | Data | Done | Result | Error,
    Field(discriminator="ev"),
]
_EVENT: TypeAdapter[Event] = TypeAdapter(Event)
# Events that carry bytes after their header; any other with a payload is refused.
_WITH_PAYLOAD = ("out", "data")


def encode_request(header: dict[str, Any], payload: bytes = b"") -> bytes:
    head = json.dumps(header, separators=(",", ":")).encode()
    return HEADER.pack(len(head), len(payload)) + head + payload


@dataclass
class FrameReader:
    """Cuts the guest's byte stream into validated (event, payload) pairs."""

    buffer: bytearray = field(default_factory=bytearray)

    def feed(self, data: bytes) -> list[tuple[Event, bytes]]:
        self.buffer += data
        frames = []
        while len(self.buffer) >= HEADER.size:
            head_len, payload_len = HEADER.unpack_from(self.buffer)
            if head_len > MAX_HEADER_BYTES or payload_len > MAX_PAYLOAD_BYTES:
                raise GuestProtocolError(f"frame too large ({head_len} + {payload_len} bytes)")
            end = HEADER.size + head_len + payload_len
            if len(self.buffer) < end:
                break
            head = bytes(self.buffer[HEADER.size : HEADER.size + head_len])
            payload = bytes(self.buffer[HEADER.size + head_len : end])
            del self.buffer[:end]
            frames.append((_event(head, payload), payload))
        return frames


def _event(head: bytes, payload: bytes) -> Event:
    try:
        raw = json.loads(head)
    except (ValueError, RecursionError):
        raise GuestProtocolError("frame header is not JSON") from None
    if not isinstance(raw, dict):
        raise GuestProtocolError("frame header is not an object")
    try:
        check_json(raw)
    except ValueError as exc:
        raise GuestProtocolError(str(exc)) from None
    try:
        event: Event = _EVENT.validate_python(raw)
    except ValidationError as exc:
        raise GuestProtocolError(f"invalid event: {exc.errors(include_url=False)[0]}") from None
    if payload and event.ev not in _WITH_PAYLOAD:
        raise GuestProtocolError(f"{event.ev} frame with a payload")
    if not payload and event.ev in _WITH_PAYLOAD:
        # Never sent empty: empty ones would cost nothing against a window.
        raise GuestProtocolError(f"{event.ev} frame without bytes")
    return event
