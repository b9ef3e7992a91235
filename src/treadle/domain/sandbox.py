"""The sandbox state machine (DESIGN §10): the only place that decides which transitions exist.

A sandbox has a desired status, set through the API (`running`, `paused`, `stopped`), and an
observed status, moved by what its node reports and by the reconciler:

    pending ──place──▶ starting ──started──▶ running ◀──resumed── paused
       ▲                  │                    │ └──────paused──────▶ │
       │                  │                    │                      │
       └── restart ◀──────┴── ended/lost ──────┴──────────────────────┘   (incarnation + 1)
                                                │
    (any live status) ──stop──▶ stopping ──stopped──▶ stopped
    (starting, running, paused, stopping) ──ended/lost, no restart──▶ stopped | failed

`stopped` and `failed` are terminal: a sandbox reaches exactly one of them. Each start on a
node is an incarnation; reports name theirs, and only the current one moves the sandbox
(fencing, as attempts are for executions). `next_step` is what the reconciler does to bring
observed toward desired; `after_end` decides, by the restart policy, what an incarnation's end
means for the sandbox.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Self

from pydantic import Field, field_validator, model_validator

from treadle.domain.desktop import DesktopSpec
from treadle.domain.errors import InvalidTransition
from treadle.domain.function import WorkloadSpec
from treadle.domain.resources import Resources, Tier

__all__ = [
    "ACTIVITY_INTERVAL_S",
    "BURST_MILLICORES",
    "DEFAULT_HOME",
    "IDLE_CPU_CORES",
    "LIVE_STATUSES",
    "ON_NODE_STATUSES",
    "PAUSABLE_TIERS",
    "STARTING_STATUSES",
    "TERMINAL_STATUSES",
    "Decision",
    "Desired",
    "End",
    "ExpiryAction",
    "RestartPolicy",
    "SandboxEvent",
    "SandboxSpec",
    "SandboxStatus",
    "Step",
    "after_end",
    "apply",
    "awake_reasons",
    "boundary_resources",
    "check_home",
    "check_takes_work",
    "desire",
    "next_step",
]


class SandboxStatus(StrEnum):
    PENDING = "pending"
    STARTING = "starting"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"


class Desired(StrEnum):
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"


class RestartPolicy(StrEnum):
    ALWAYS = "always"
    ON_FAILURE = "on_failure"
    NEVER = "never"


class ExpiryAction(StrEnum):
    """What the TTL or the idle timeout does when it fires."""

    STOP = "stop"
    PAUSE = "pause"


class SandboxEvent(StrEnum):
    PLACE = "place"  # the reconciler chose a node and sent the start
    STARTED = "started"  # the node: the agent answers
    PAUSED = "paused"  # the node: frozen
    RESUMED = "resumed"  # the node: thawed
    STOP = "stop"  # the reconciler sent the stop
    STOPPED = "stopped"  # the node: nothing of it is left
    RESTART = "restart"  # the incarnation ended and policy starts another
    END = "end"  # the incarnation ended and policy starts none
    FAIL = "fail"  # the same, as a failure


class End(StrEnum):
    """How an incarnation ended, without a stop being asked for."""

    EXITED = "exited"  # its first process (the agent) ended on its own, cleanly
    CRASHED = "crashed"  # it ended with an error: the agent died, a start failed, a limit
    NODE_LOST = "node_lost"  # its node went away for longer than the grace period


TERMINAL_STATUSES = frozenset({SandboxStatus.STOPPED, SandboxStatus.FAILED})
LIVE_STATUSES = frozenset(set(SandboxStatus) - TERMINAL_STATUSES)
# What a node may be holding: everything between the start sent and the stop confirmed.
ON_NODE_STATUSES = frozenset(
    {
        SandboxStatus.STARTING,
        SandboxStatus.RUNNING,
        SandboxStatus.PAUSED,
        SandboxStatus.STOPPING,
    }
)

_S = SandboxStatus
_E = SandboxEvent
_TABLE: dict[tuple[SandboxStatus, SandboxEvent], SandboxStatus] = {
    (_S.PENDING, _E.PLACE): _S.STARTING,
    (_S.PENDING, _E.STOP): _S.STOPPED,  # nothing on any node: nothing to wait for
    (_S.STARTING, _E.STARTED): _S.RUNNING,
    (_S.RUNNING, _E.PAUSED): _S.PAUSED,
    (_S.PAUSED, _E.RESUMED): _S.RUNNING,
    # A node may report the same state again (a replayed report): harmless.
    (_S.RUNNING, _E.STARTED): _S.RUNNING,
    (_S.RUNNING, _E.RESUMED): _S.RUNNING,
    (_S.PAUSED, _E.PAUSED): _S.PAUSED,
}
for _status in ON_NODE_STATUSES:
    _TABLE[(_status, _E.STOP)] = _S.STOPPING
    _TABLE[(_status, _E.STOPPED)] = _S.STOPPED
    _TABLE[(_status, _E.RESTART)] = _S.PENDING
    _TABLE[(_status, _E.END)] = _S.STOPPED
    _TABLE[(_status, _E.FAIL)] = _S.FAILED


def apply(status: SandboxStatus, event: SandboxEvent) -> SandboxStatus:
    """The status after `event`, or InvalidTransition when `event` is not valid in it."""
    try:
        return _TABLE[(status, event)]
    except KeyError:
        raise InvalidTransition(
            f"cannot {event.value} a sandbox that is {status.value}",
            details={"state": status.value, "event": event.value},
        ) from None


# What a sandbox may use of the CPU while its node has it to spare: placement reserves its
# `cpu_millicores`, but its cgroup lets it burst to one core (a node short of CPU shares it
# out by the cgroups' equal default weights). An idle sandbox then costs a node little of
# its capacity, and the one an agent works in is not held to a trickle: its guest agent
# alone takes ~50 ms of CPU to start, which at a 10-millicore quota took two seconds
# (Kubernetes' requests and limits, in short).
BURST_MILLICORES = 1000


def boundary_resources(resources: Resources) -> Resources:
    """What a sandbox's boundary enforces, for what it asked and was placed by."""
    burst = max(resources.cpu_millicores, BURST_MILLICORES)
    return resources.model_copy(update={"cpu_millicores": burst})


# The idle policy. A running sandbox is awake while any of `awake_reasons` holds: a process
# runs in it besides its agent (started by exec or not: `sleep 60 &` counts), a stream is
# open on it (an exec'd process followed, a PTY, a proxied connection, a file transfer), or
# it spent more than IDLE_CPU_CORES of a core since the last look. Its node looks every
# ACTIVITY_INTERVAL_S, so an idle timeout fires up to that much later than asked.
ACTIVITY_INTERVAL_S = 2.0
IDLE_CPU_CORES = 0.05


def awake_reasons(processes: int, streams: dict[str, int], cpu_cores: float | None) -> list[str]:
    """Why a sandbox is not idle, as `GET` shows it; empty when it is idle."""
    reasons = []
    if processes > 0:
        reasons.append(_count(processes, "process", "processes") + " running")
    for kind, one, many in (
        ("exec", "exec stream", "exec streams"),
        ("port", "proxied connection", "proxied connections"),
        ("file", "file transfer", "file transfers"),
    ):
        if streams.get(kind):
            reasons.append(_count(streams[kind], one, many) + " open")
    if cpu_cores is not None and cpu_cores > IDLE_CPU_CORES:
        reasons.append(f"CPU use above {IDLE_CPU_CORES:.0%} of a core")
    return reasons


def _count(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


# The tiers that can freeze a sandbox in place (the process tier has no boundary to freeze).
PAUSABLE_TIERS = frozenset({Tier.NAMESPACE, Tier.OCI, Tier.GVISOR, Tier.MICROVM})


def desire(
    current: Desired, wanted: Desired, status: SandboxStatus, tier: Tier | None = None
) -> Desired:
    """The desired status after a client asks for `wanted`; InvalidTransition where that
    cannot be had: a stopped sandbox stays stopped (a new one is created instead), and one
    in a tier that cannot pause is not paused."""
    if wanted == Desired.PAUSED and tier is not None and tier not in PAUSABLE_TIERS:
        raise InvalidTransition(
            f"a sandbox in the {tier.value} tier cannot be paused",
            details={"state": status.value, "isolation": tier.value},
        )
    if status in TERMINAL_STATUSES or current == Desired.STOPPED:
        if wanted == Desired.STOPPED:
            return Desired.STOPPED  # stopping twice is no error
        raise InvalidTransition(
            f"cannot make a sandbox that is {status.value} {wanted.value}",
            details={"state": status.value, "desired": wanted.value},
        )
    return wanted


STARTING_STATUSES = frozenset({SandboxStatus.PENDING, SandboxStatus.STARTING})


def check_takes_work(sandbox_id: str, status: SandboxStatus, desired: Desired) -> None:
    """InvalidTransition unless the sandbox takes work (exec, files, envd, ports): it runs
    and is to go on running. One asked to stop (E2B's kill) or pause takes none while its
    node ends it, so a killed sandbox's token opens nothing from the moment of the kill."""
    if status != SandboxStatus.RUNNING:
        raise InvalidTransition(
            f"sandbox {sandbox_id} is {status.value}, not running",
            details={"id": sandbox_id, "state": status.value},
        )
    if desired != Desired.RUNNING:
        raise InvalidTransition(
            f"sandbox {sandbox_id} is to be {desired.value}, and takes no more work",
            details={"id": sandbox_id, "state": status.value, "desired": desired.value},
        )


class Step(StrEnum):
    """What the reconciler does next for one sandbox."""

    PLACE = "place"  # find a node and send the start
    PAUSE = "pause"
    RESUME = "resume"
    STOP = "stop"  # send the stop to its node
    FINISH = "finish"  # stopped before it reached a node: record it stopped


def next_step(desired: Desired, status: SandboxStatus) -> Step | None:
    """The step toward `desired` from `status`, or None while there is nothing to do (done,
    or waiting for the node to report)."""
    if status in TERMINAL_STATUSES:
        return None
    if desired == Desired.STOPPED:
        if status == _S.PENDING:
            return Step.FINISH
        return None if status == _S.STOPPING else Step.STOP
    if status == _S.PENDING:
        return Step.PLACE
    if desired == Desired.PAUSED and status == _S.RUNNING:
        return Step.PAUSE
    if desired == Desired.RUNNING and status == _S.PAUSED:
        return Step.RESUME
    return None


@dataclass(frozen=True, slots=True)
class Decision:
    event: SandboxEvent
    # Why the incarnation ended, in words for the sandbox and its event.
    reason: str


def after_end(policy: RestartPolicy, end: End, desired: Desired) -> Decision:
    """What an incarnation's end, not asked for, means: a new incarnation elsewhere or the
    same node (RESTART), or the end of the sandbox (END, FAIL). A sandbox meant to stop is
    never restarted."""
    reason = end.value
    if desired == Desired.STOPPED:
        return Decision(_E.END, reason)
    failed = end != End.EXITED
    if policy == RestartPolicy.ALWAYS or (policy == RestartPolicy.ON_FAILURE and failed):
        return Decision(_E.RESTART, reason)
    return Decision(_E.FAIL if failed else _E.END, reason)


_METADATA_KEY = re.compile(r"^[A-Za-z0-9_.:/-]{1,64}$")

# Where a sandbox's writable work dir may be mounted (its `home`: HOME and where processes and
# relative paths start): an absolute path of plain names, never over what every sandbox needs
# as it is (the programs, /etc, /proc, /dev, /tmp, treadle's own mounts).
DEFAULT_HOME = "/work"
_HOME = re.compile(r"^(/[A-Za-z0-9_][A-Za-z0-9._-]{0,63}){1,8}$")
_RESERVED_TOP = frozenset(
    {"bin", "boot", "dev", "etc", "lib", "lib32", "lib64", "libx32", "proc", "run", "sbin"}
    | {"sys", "tmp", "usr", ".treadle"}
)


# A process exec'd in a sandbox, however it is asked for (treadle's exec, envd's Start): its
# argv, environment, working directory and tag.
MAX_ARGS = 4096
MAX_ARG_CHARS = 128 * 1024
MAX_ENV = 1024
MAX_CWD = 4096
MAX_TAG = 256


def check_argv(argv: list[str]) -> list[str]:
    if not argv or not argv[0]:
        raise ValueError("the first argument must name a program")
    if len(argv) > MAX_ARGS:
        raise ValueError(f"at most {MAX_ARGS} arguments")
    if any(len(arg) > MAX_ARG_CHARS or "\x00" in arg for arg in argv):
        raise ValueError(f"an argument is at most {MAX_ARG_CHARS} characters, without NUL")
    return argv


def check_env(env: dict[str, str]) -> dict[str, str]:
    if len(env) > MAX_ENV:
        raise ValueError(f"at most {MAX_ENV} environment variables")
    for name, value in env.items():
        if not name or "=" in name or "\x00" in name or "\x00" in value:
            raise ValueError(f"env name {name[:64]!r} or its value is not valid")
    return env


def check_home(path: str) -> str:
    """`path` if a sandbox's home may be there; ValueError saying why not."""
    if not _HOME.match(path) or ".." in path.split("/"):
        raise ValueError(f"home {path!r}: an absolute path of 1-8 plain names")
    if path.split("/")[1] in _RESERVED_TOP:
        raise ValueError(f"home {path!r}: not under /{path.split('/')[1]}")
    return path


# E2B's default TTL; a sandbox nobody refreshes is not left running for good.
DEFAULT_TIMEOUT_S = 300.0
MAX_TIMEOUT_S = 7 * 24 * 3600.0


class SandboxSpec(WorkloadSpec):
    """The body of `POST /v1/sandboxes`: what the sandbox runs on and is placed by (as for
    functions), its labels and its policies."""

    # Labels to find it by (`GET /v1/sandboxes?metadata=k:v`): at most 64, short.
    metadata: dict[str, str] = Field(default_factory=dict, max_length=64)
    # Its TTL: stopped or paused (`on_expiry`) this long after creation or the last refresh.
    timeout_s: float = Field(default=DEFAULT_TIMEOUT_S, gt=0, le=MAX_TIMEOUT_S)
    idle_timeout_s: float | None = Field(default=None, gt=0, le=MAX_TIMEOUT_S)
    on_expiry: ExpiryAction = ExpiryAction.STOP
    restart: RestartPolicy = RestartPolicy.ON_FAILURE
    # Where its writable work dir is (HOME, and where processes and relative paths start).
    home: str = DEFAULT_HOME
    # Its ports are open to whoever has their URL, with no credential (E2B's public traffic).
    public_ports: bool = False
    # Its user may run commands as root with `sudo` (where the tier has users of its own).
    sudo: bool = False
    # A display, driven through ctrl and watched through stream (`treadle.domain.desktop`).
    desktop: DesktopSpec | None = None

    @field_validator("home")
    @classmethod
    def _home(cls, value: str) -> str:
        return check_home(value)

    @model_validator(mode="after")
    def _desktop_needs_a_boundary(self) -> Self:
        if self.desktop is not None and self.isolation is Tier.PROCESS:
            raise ValueError(
                "a desktop needs a tier with a display and network of its own (namespace "
                "or stronger), not process"
            )
        return self

    @property
    def tier_floor(self) -> Tier | None:
        """As for any workload; a desktop also needs a sandbox of its own network (its X
        server and ports are on the sandbox's loopback): the namespace tier at least."""
        floor = super().tier_floor
        if self.desktop is not None and (floor is None or floor.strength < Tier.NAMESPACE.strength):
            return Tier.NAMESPACE
        return floor

    @field_validator("metadata")
    @classmethod
    def _short_labels(cls, value: dict[str, str]) -> dict[str, str]:
        for key, val in value.items():
            if not _METADATA_KEY.match(key):
                raise ValueError(f"metadata key {key!r}: 1-64 of A-Z a-z 0-9 _ . : / -")
            if len(val) > 512:
                raise ValueError(f"metadata value of {key!r} is longer than 512 characters")
        return value
