"""Frame types. Each WebSocket text frame is one JSON object with a `type` field.

Every message about an execution names its `attempt`; receivers ignore (and fence) messages
for attempts other than the current one. Output chunks carry one `seq` per attempt, shared by
stdout and stderr, so interleaving is preserved and storage can be idempotent.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from treadle.domain.errors import ProtocolError
from treadle.domain.resources import Resources, Tier

__all__ = [
    "PROTOCOL_VERSION",
    "Ack",
    "Assign",
    "AssignSpec",
    "AttemptRef",
    "Cancel",
    "Chunk",
    "Exited",
    "Heartbeat",
    "Hello",
    "Output",
    "ShuttleMessage",
    "Started",
    "Usage",
    "WeaverMessage",
    "Welcome",
    "decode_from_shuttle",
    "decode_from_weaver",
    "encode",
]

PROTOCOL_VERSION = 1


class _Frame(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AttemptRef(_Frame):
    id: str
    attempt: int = Field(ge=1)


class Chunk(_Frame):
    stream: Literal["stdout", "stderr"]
    seq: int = Field(ge=0)
    data: str


class Usage(_Frame):
    wall_ms: float = Field(default=0.0, ge=0)
    cpu_ms: float | None = Field(default=None, ge=0)
    max_rss_kib: int | None = Field(default=None, ge=0)


# shuttle → weaver


class Hello(_Frame):
    type: Literal["hello"] = "hello"
    protocol: int
    name: str = Field(max_length=253)
    capacity: Resources
    runtimes: list[Tier]
    labels: dict[str, str] = Field(default_factory=dict)
    region: str | None = None
    zone: str | None = None
    provider: str = "local"
    price_per_hour: float = Field(default=0.0, ge=0)
    country: str | None = Field(default=None, pattern=r"^[A-Z]{2}$")
    # A spot (preemptible) node, billed at `spot_price_per_hour` when given.
    spot: bool = False
    spot_price_per_hour: float | None = Field(default=None, ge=0)
    # Relative single-core speed measured at start-up (see treadle.shuttle.benchmark).
    perf_score: float = Field(default=1.0, gt=0, le=1e6)
    # Work that does not tolerate one of these keys is not placed here.
    taints: dict[str, str] = Field(default_factory=dict)
    # The tiers in which this node gives an execution network when its function asks.
    network_tiers: list[Tier] = Field(default_factory=list)
    running: list[AttemptRef] = Field(default_factory=list)


class Heartbeat(_Frame):
    type: Literal["heartbeat"] = "heartbeat"
    running: list[AttemptRef] = Field(default_factory=list)
    load: float | None = None


class Started(_Frame):
    type: Literal["started"] = "started"
    id: str
    attempt: int = Field(ge=1)


class Output(_Frame):
    type: Literal["output"] = "output"
    id: str
    attempt: int = Field(ge=1)
    chunks: list[Chunk] = Field(min_length=1)


class Exited(_Frame):
    """The end of an attempt. `chunks` is how many output chunks the attempt produced in all,
    so Weaver can tell when it holds the complete output."""

    type: Literal["exited"] = "exited"
    id: str
    attempt: int = Field(ge=1)
    exit_code: int | None
    reason: str | None = None
    result: Any = None
    chunks: int = Field(ge=0)
    usage: Usage = Field(default_factory=Usage)


ShuttleMessage = Annotated[
    Hello | Heartbeat | Started | Output | Exited, Field(discriminator="type")
]


# weaver → shuttle


class Welcome(_Frame):
    type: Literal["welcome"] = "welcome"
    protocol: int
    node_id: str
    node_secret: str | None = None
    heartbeat_s: float = Field(gt=0)


class AssignSpec(_Frame):
    id: str
    attempt: int = Field(ge=1)
    tenant_id: str
    function: str
    version: int
    argv: list[str] = Field(min_length=1)
    env: dict[str, str] = Field(default_factory=dict)
    source: str | None = None
    source_name: str = "main"
    args: dict[str, Any] = Field(default_factory=dict)
    stdin: str | None = None
    timeout_s: float = Field(gt=0)
    resources: Resources
    isolation: Tier
    # A registry reference; None runs the program on the host's read-only programs.
    image: str | None = None
    # The function asked for network; the node gives it only where its operator allows it.
    network: bool = False


class Assign(_Frame):
    type: Literal["assign"] = "assign"
    spec: AssignSpec


class Cancel(_Frame):
    type: Literal["cancel"] = "cancel"
    id: str
    attempt: int = Field(ge=1)
    reason: str = "cancelled"


class Ack(_Frame):
    """Weaver stored output chunks up to and including `seq` (all of them when `exited`)."""

    type: Literal["ack"] = "ack"
    id: str
    attempt: int = Field(ge=1)
    seq: int | None = None
    exited: bool = False


WeaverMessage = Annotated[Welcome | Assign | Cancel | Ack, Field(discriminator="type")]

_FROM_SHUTTLE: TypeAdapter[ShuttleMessage] = TypeAdapter(ShuttleMessage)
_FROM_WEAVER: TypeAdapter[WeaverMessage] = TypeAdapter(WeaverMessage)


def _decode(adapter: TypeAdapter[Any], raw: str | bytes) -> Any:
    try:
        return adapter.validate_json(raw)
    except ValidationError as exc:
        raise ProtocolError(
            "frame is not a valid protocol message",
            details=exc.errors(include_url=False, include_context=False, include_input=False),
        ) from None


def decode_from_shuttle(raw: str | bytes) -> ShuttleMessage:
    msg: ShuttleMessage = _decode(_FROM_SHUTTLE, raw)
    return msg


def decode_from_weaver(raw: str | bytes) -> WeaverMessage:
    msg: WeaverMessage = _decode(_FROM_WEAVER, raw)
    return msg


def encode(message: _Frame) -> str:
    return message.model_dump_json()
