"""Frame types. Each WebSocket text frame is one JSON object with a `type` field.

Every message about an execution names its `attempt`; receivers ignore (and fence) messages
for attempts other than the current one. Output chunks carry one `seq` per attempt, shared by
stdout and stderr, so interleaving is preserved and storage can be idempotent.

Every frame is held to `treadle.protocol.limits`: finite numbers, integers that fit the
columns storing them, free-form JSON (`args`, `result`) at most MAX_JSON_DEPTH deep.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from treadle.domain.desktop import DesktopSpec
from treadle.domain.errors import ProtocolError
from treadle.domain.resources import Resources, Tier
from treadle.domain.sandbox import check_home
from treadle.protocol.limits import (
    INT32_MAX,
    INT32_MIN,
    INT64_MAX,
    RESULT_INVALID,
    JsonObject,
    JsonValue,
    check_json,
)

__all__ = [
    "PROTOCOL_VERSION",
    "STREAM_CHUNK_BYTES",
    "USER_PATTERN",
    "Ack",
    "Assign",
    "AssignSpec",
    "AttemptRef",
    "Cancel",
    "Chunk",
    "ExecStart",
    "Exited",
    "FileStart",
    "Heartbeat",
    "Hello",
    "Output",
    "Pty",
    "Refused",
    "SandboxControl",
    "SandboxSpec",
    "SandboxStart",
    "SandboxState",
    "ShuttleMessage",
    "Started",
    "StreamData",
    "StreamDetach",
    "StreamEnd",
    "StreamInput",
    "StreamResize",
    "StreamSignal",
    "StreamWindow",
    "Usage",
    "UsageAck",
    "UsageKey",
    "UsageRecord",
    "UsageReport",
    "WeaverMessage",
    "Welcome",
    "WorkloadRef",
    "decode_from_shuttle",
    "decode_from_weaver",
    "encode",
    "examine_refused",
]

# 3: usage records (`usage`, `usage_ack`).
PROTOCOL_VERSION = 3
# Usage records in one frame (a report, or an acknowledgement).
MAX_USAGE_RECORDS = 1000


class _Frame(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


# Attempts, chunk numbers and counts, exit codes and versions are stored in 32-bit columns.
Attempt = Annotated[int, Field(ge=1, le=INT32_MAX)]
Count = Annotated[int, Field(ge=0, le=INT32_MAX)]


class AttemptRef(_Frame):
    id: str
    attempt: Attempt


class Chunk(_Frame):
    stream: Literal["stdout", "stderr"]
    seq: Count
    # Never empty: each stored chunk then counts against the output cap.
    data: str = Field(min_length=1)


class Usage(_Frame):
    wall_ms: float = Field(default=0.0, ge=0)
    cpu_ms: float | None = Field(default=None, ge=0)
    max_rss_kib: int | None = Field(default=None, ge=0, le=INT64_MAX)


# Metering (DESIGN §13): what a workload used over an interval of its life, as its node
# measured it. Each record is one interval: a workload's records, numbered from 1 without
# gaps, add up to its whole use, so they are stored once each (by kind, id, generation and
# seq) and never summed twice. A node keeps a record until Weaver acknowledges it. What a
# node says is bounded here (it may lie; Weaver prices, and checks the times against its
# own); `final` marks a workload's last record.
_SECONDS = Annotated[float, Field(ge=0, le=366 * 24 * 3600)]
_BYTES = Annotated[int, Field(ge=0, le=2**53)]


class UsageRecord(_Frame):
    kind: Literal["execution", "sandbox"]
    id: str = Field(min_length=1, max_length=200)
    generation: Attempt
    seq: Attempt
    # The interval, in seconds since the epoch by the node's clock.
    start: float = Field(ge=0, le=1e11)
    end: float = Field(ge=0, le=1e11)
    final: bool = False
    wall_s: _SECONDS = 0.0
    paused_s: _SECONDS = 0.0
    cpu_s: _SECONDS = 0.0
    memory_peak_mib: float = Field(default=0.0, ge=0, le=2**40)
    memory_gib_s: float = Field(default=0.0, ge=0, le=2**40)
    disk_read_bytes: _BYTES = 0
    disk_write_bytes: _BYTES = 0
    net_in_bytes: _BYTES = 0
    net_out_bytes: _BYTES = 0
    gpu_s: _SECONDS = 0.0
    gpu_memory_peak_mib: float = Field(default=0.0, ge=0, le=2**40)

    @property
    def key(self) -> tuple[str, str, int, int]:
        return self.kind, self.id, self.generation, self.seq

    @model_validator(mode="after")
    def _consistent(self) -> UsageRecord:
        if self.end < self.start:
            raise ValueError("a usage interval ends before it starts")
        if self.paused_s > self.wall_s or self.wall_s > self.end - self.start + 1.0:
            raise ValueError("a usage interval's times do not add up")
        return self


class UsageKey(_Frame):
    kind: Literal["execution", "sandbox"]
    id: str = Field(min_length=1, max_length=200)
    generation: Attempt
    seq: Attempt


class UsageReport(_Frame):
    type: Literal["usage"] = "usage"
    records: list[UsageRecord] = Field(min_length=1, max_length=MAX_USAGE_RECORDS)


# Sandboxes (long-lived workloads). A sandbox's `incarnation` is to it what an attempt is
# to an execution: each start on a node is a new one, and only the current one counts.
SandboxId = Annotated[str, Field(min_length=1, max_length=64)]
# Streams of exec'd processes, numbered by Weaver per link; their bytes travel as base64.
StreamId = Annotated[int, Field(ge=1, le=INT32_MAX)]
# A user inside a sandbox, by name or uid; None: the sandbox's own user.
USER_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,31}$"
User = Annotated[str, Field(pattern=USER_PATTERN)]
# 256 KiB of bytes as base64, and a little room.
STREAM_CHUNK_BYTES = 256 * 1024
Base64 = Annotated[str, Field(max_length=STREAM_CHUNK_BYTES * 4 // 3 + 8)]


class WorkloadRef(_Frame):
    """One workload a node holds. Executions and sandboxes are alike to the node session:
    a kind, an id, and a generation (an execution's attempt, a sandbox's incarnation) that
    fencing works on. A sandbox also says the state it is in."""

    kind: Literal["execution", "sandbox"]
    id: str = Field(min_length=1, max_length=200)
    generation: Attempt
    state: Literal["starting", "running", "paused"] | None = None

    @property
    def key(self) -> tuple[str, int]:
        return self.id, self.generation


# shuttle → weaver


class Hello(_Frame):
    type: Literal["hello"] = "hello"
    protocol: int = Field(ge=0, le=INT32_MAX)
    name: str = Field(max_length=253)
    capacity: Resources
    runtimes: list[Tier]
    labels: dict[str, str] = Field(default_factory=dict)
    # As wide as the columns that store them.
    region: str | None = Field(default=None, max_length=64)
    zone: str | None = Field(default=None, max_length=64)
    provider: str = Field(default="local", max_length=64)
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
    # Every workload this node holds: attempts still running or not yet stored by Weaver,
    # and sandboxes in the state they are in now.
    workloads: list[WorkloadRef] = Field(default_factory=list)


class Heartbeat(_Frame):
    type: Literal["heartbeat"] = "heartbeat"
    workloads: list[WorkloadRef] = Field(default_factory=list)
    load: float | None = None


class Started(_Frame):
    type: Literal["started"] = "started"
    id: str
    attempt: Attempt


class Output(_Frame):
    type: Literal["output"] = "output"
    id: str
    attempt: Attempt
    chunks: list[Chunk] = Field(min_length=1)


class Exited(_Frame):
    """The end of an attempt. `chunks` is how many output chunks the attempt produced in all,
    so Weaver can tell when it holds the complete output."""

    type: Literal["exited"] = "exited"
    id: str
    attempt: Attempt
    exit_code: int | None = Field(ge=INT32_MIN, le=INT32_MAX)
    reason: str | None = None
    result: JsonValue = None
    chunks: Count
    usage: Usage = Field(default_factory=Usage)

    @classmethod
    def report(
        cls,
        *,
        id: str,
        attempt: int,
        exit_code: int | None,
        reason: str | None,
        result: Any,
        chunks: int,
        usage: Usage,
    ) -> Exited:
        """The exit report of an attempt whose program left `result`. A result outside the
        limits is dropped, and the attempt then fails with RESULT_INVALID, unless it already
        ended for a reason of its own (a timeout, a signal), which stays."""
        try:
            check_json(result)
        except ValueError:
            result, reason = None, reason or RESULT_INVALID
        return cls(
            id=id,
            attempt=attempt,
            exit_code=exit_code,
            reason=reason,
            result=result,
            chunks=chunks,
            usage=usage,
        )


class SandboxState(_Frame):
    """Where a sandbox's incarnation stands on its node; `stopped` and `failed` are its end,
    after which the node holds nothing of it. `reason` says why it ended when not asked to."""

    type: Literal["sandbox_state"] = "sandbox_state"
    id: SandboxId
    incarnation: Attempt
    state: Literal["running", "paused", "stopped", "failed"]
    reason: str | None = Field(default=None, max_length=1024)


class StreamData(_Frame):
    """Bytes of an exec'd process, within the window Weaver granted its stream."""

    type: Literal["stream_data"] = "stream_data"
    stream: StreamId
    channel: Literal["stdout", "stderr"]
    data: Base64


class StreamStarted(_Frame):
    """The process a stream follows: its pid as the sandbox sees it, and its tag."""

    type: Literal["stream_started"] = "stream_started"
    stream: StreamId
    pid: int | None = Field(default=None, ge=1, le=INT32_MAX)
    tag: str | None = Field(default=None, max_length=256)


class StreamAck(_Frame):
    """Input of a stream (stdin, an upload, a connection's bytes) that the node has passed
    on: Weaver keeps at most a window of input unacknowledged per stream."""

    type: Literal["stream_ack"] = "stream_ack"
    stream: StreamId
    bytes: Count


class StreamEnd(_Frame):
    """The end of a stream: its process's exit, a file operation's `result`, or why there is
    none (`error`, with the errno name as `error_code` where the sandbox gave one)."""

    type: Literal["stream_end"] = "stream_end"
    stream: StreamId
    exit_code: int | None = Field(default=None, ge=0, le=255)
    signal: int | None = Field(default=None, ge=1, le=64)
    # killed by the node at the process's own `timeout_s`
    timed_out: bool = False
    error: str | None = Field(default=None, max_length=1024)
    error_code: str | None = Field(default=None, pattern=r"^E[A-Z0-9]{1,30}$")
    result: JsonValue = None


class SandboxActivity(_Frame):
    """Whether a running sandbox is doing work, as its node sees it: `reasons` say what keeps
    it awake (processes, open streams and connections, CPU), `idle_for_s` how long nothing
    has. Sent when either changes in kind, not at every look."""

    type: Literal["sandbox_activity"] = "sandbox_activity"
    id: SandboxId
    incarnation: Attempt
    idle_for_s: float | None = Field(default=None, ge=0, le=10 * 365 * 24 * 3600)
    reasons: list[Annotated[str, Field(max_length=256)]] = Field(default_factory=list, max_length=8)


ShuttleMessage = Annotated[
    Hello
    | Heartbeat
    | Started
    | Output
    | Exited
    | SandboxState
    | SandboxActivity
    | StreamStarted
    | StreamData
    | StreamAck
    | StreamEnd
    | UsageReport,
    Field(discriminator="type"),
]


# weaver → shuttle


class Welcome(_Frame):
    type: Literal["welcome"] = "welcome"
    protocol: int = Field(ge=0, le=INT32_MAX)
    node_id: str
    node_secret: str | None = None
    heartbeat_s: float = Field(gt=0)


class AssignSpec(_Frame):
    id: str
    attempt: Attempt
    tenant_id: str
    function: str
    version: int = Field(ge=1, le=INT32_MAX)
    argv: list[str] = Field(min_length=1)
    env: dict[str, str] = Field(default_factory=dict)
    source: str | None = None
    source_name: str = "main"
    args: JsonObject = Field(default_factory=dict)
    stdin: str | None = None
    timeout_s: float = Field(gt=0)
    resources: Resources
    isolation: Tier
    # A registry reference; None runs the program on the host's read-only programs.
    image: str | None = None
    # The function asked for network; the node gives it only where its operator allows it.
    network: bool = False
    # Bytes of output (stdout and stderr together) the node forwards before it cuts the rest
    # (treadle.protocol.limits.OutputBudget); None: no cap.
    max_output_bytes: int | None = Field(default=None, ge=0, le=INT64_MAX)
    # Where the work dir is inside the sandbox (None: the sandbox layer's own, /work); a
    # sandbox's `home`.
    workdir: str | None = None
    # No args file (a long-lived sandbox has no single call's arguments).
    no_args: bool = False

    @field_validator("workdir")
    @classmethod
    def _workdir(cls, value: str | None) -> str | None:
        return None if value is None else check_home(value)


class Assign(_Frame):
    type: Literal["assign"] = "assign"
    spec: AssignSpec


class Cancel(_Frame):
    type: Literal["cancel"] = "cancel"
    id: str
    attempt: Attempt
    reason: str = "cancelled"


class UsageAck(_Frame):
    """Weaver stored these usage records (or refused them for good): the node drops them."""

    type: Literal["usage_ack"] = "usage_ack"
    keys: list[UsageKey] = Field(max_length=MAX_USAGE_RECORDS)


class Ack(_Frame):
    """Weaver stored output chunks up to and including `seq` (all of them when `exited`)."""

    type: Literal["ack"] = "ack"
    id: str
    attempt: Attempt
    seq: Count | None = None
    exited: bool = False


class SandboxSpec(_Frame):
    id: SandboxId
    incarnation: Attempt
    tenant_id: str
    resources: Resources
    isolation: Tier
    # A registry reference; None: the host's read-only programs, as for executions.
    image: str | None = None
    env: dict[str, str] = Field(default_factory=dict)
    network: bool = False
    home: str | None = None
    sudo: bool = False
    # A desktop sandbox's display: its node starts the desktop's sidecars in it.
    desktop: DesktopSpec | None = None

    @field_validator("home")
    @classmethod
    def _home(cls, value: str | None) -> str | None:
        return None if value is None else check_home(value)


class SandboxStart(_Frame):
    type: Literal["sandbox_start"] = "sandbox_start"
    spec: SandboxSpec


class SandboxControl(_Frame):
    type: Literal["sandbox_control"] = "sandbox_control"
    id: SandboxId
    incarnation: Attempt
    action: Literal["stop", "pause", "resume"]


class Pty(_Frame):
    rows: int = Field(ge=1, le=1000)
    cols: int = Field(ge=1, le=1000)


class ExecStart(_Frame):
    """Start a process in a sandbox, its output on `stream`: at most `window` bytes until
    Weaver grants more (StreamWindow)."""

    type: Literal["exec_start"] = "exec_start"
    stream: StreamId
    id: SandboxId
    incarnation: Attempt
    argv: list[Annotated[str, Field(max_length=128 * 1024)]] = Field(min_length=1, max_length=4096)
    env: dict[str, str] = Field(default_factory=dict)
    cwd: str | None = Field(default=None, max_length=4096)
    tag: str | None = Field(default=None, max_length=256)
    stdin: bool = False
    pty: Pty | None = None
    window: Count
    # The node kills the process (SIGKILL to its group) this long after it started.
    timeout_s: float | None = Field(default=None, gt=0, le=7 * 24 * 3600)
    user: User | None = None


class ProcessCall(_Frame):
    """About the processes exec'd in a sandbox, on `stream`: `list` ends with them as the
    result; `attach` follows one (by `pid`, else the latest with `tag`) as ExecStart's stream
    does, starting with the output kept while nobody followed it; `signal` sends it
    `signal` and ends."""

    type: Literal["process_call"] = "process_call"
    stream: StreamId
    id: SandboxId
    incarnation: Attempt
    op: Literal["list", "attach", "signal"]
    pid: int | None = Field(default=None, ge=1, le=INT32_MAX)
    tag: str | None = Field(default=None, min_length=1, max_length=256)
    signal: int | None = Field(default=None, ge=1, le=64)
    window: Count = 0


class PortStart(_Frame):
    """A TCP connection to `port` on the sandbox's own loopback, made from inside it: the
    server's bytes come as the stream's `stdout`, the stream's input goes to the server, and
    the stream ends once the server has closed its side (a StreamSignal closes it)."""

    type: Literal["port_start"] = "port_start"
    stream: StreamId
    id: SandboxId
    incarnation: Attempt
    port: int = Field(ge=1, le=65535)
    window: Count


class FileStart(_Frame):
    """A file operation in a sandbox, on `stream`: `read` sends the file as stream data
    (within `window`), `write` takes it as stream input until eof, `watch` sends changes
    under a directory as JSON lines until detached; every operation ends with a StreamEnd
    carrying its result or its error. Paths are the sandbox's own."""

    type: Literal["file_start"] = "file_start"
    stream: StreamId
    id: SandboxId
    incarnation: Attempt
    op: Literal["read", "write", "stat", "list", "mkdir", "remove", "move", "watch"]
    path: str = Field(min_length=1, max_length=4096)
    target: str | None = Field(default=None, min_length=1, max_length=4096)
    depth: int = Field(default=1, ge=1, le=16)
    # watch: its subdirectories too
    recursive: bool = False
    mode: int = Field(default=0o644, ge=0, le=0o7777)
    window: Count = 0
    user: User | None = None


class StreamInput(_Frame):
    type: Literal["stream_input"] = "stream_input"
    stream: StreamId
    data: Base64 = ""
    eof: bool = False


class StreamWindow(_Frame):
    type: Literal["stream_window"] = "stream_window"
    stream: StreamId
    bytes: Count


class StreamSignal(_Frame):
    type: Literal["stream_signal"] = "stream_signal"
    stream: StreamId
    signal: int = Field(ge=1, le=64)


class StreamResize(_Frame):
    type: Literal["stream_resize"] = "stream_resize"
    stream: StreamId
    rows: int = Field(ge=1, le=1000)
    cols: int = Field(ge=1, le=1000)


class StreamDetach(_Frame):
    """Weaver no longer relays the stream (its client went away); the process runs on."""

    type: Literal["stream_detach"] = "stream_detach"
    stream: StreamId


WeaverMessage = Annotated[
    Welcome
    | Assign
    | Cancel
    | Ack
    | SandboxStart
    | SandboxControl
    | ExecStart
    | FileStart
    | ProcessCall
    | PortStart
    | StreamInput
    | StreamWindow
    | StreamSignal
    | StreamResize
    | StreamDetach
    | UsageAck,
    Field(discriminator="type"),
]

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


@dataclass(frozen=True, slots=True)
class Refused:
    """What can still be read of a frame from a node that failed validation: the attempt it is
    about, when it names one that could be valid, and for an exit report whose only fault is
    its result, that report with the result dropped (as `Exited.report` would have made it)."""

    type: str | None = None
    id: str | None = None
    attempt: int | None = None
    exited: Exited | None = None


def examine_refused(raw: str | bytes) -> Refused:
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):  # not JSON, or nested past what the parser takes
        return Refused()
    if not isinstance(data, dict):
        return Refused()
    kind = data.get("type") if isinstance(data.get("type"), str) else None
    try:
        ref = AttemptRef.model_validate({"id": data.get("id"), "attempt": data.get("attempt")})
    except ValidationError:
        return Refused(type=kind)
    exited = None
    if kind == "exited" and "result" in data:
        try:
            exited = Exited.model_validate({**data, "result": None})
        except ValidationError:
            pass
        else:
            exited = exited.model_copy(update={"reason": exited.reason or RESULT_INVALID})
    return Refused(type=kind, id=ref.id, attempt=ref.attempt, exited=exited)
