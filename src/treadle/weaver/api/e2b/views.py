"""Treadle sandboxes as E2B's control plane shows them: ids, states, the
`domain` the SDK builds host names from, and the `Sandbox`, `SandboxDetail` and
`ListedSandbox` bodies, made from `sandbox_view`'s dicts so that one mapping serves every
route."""

from __future__ import annotations

import math
import re
from typing import Any, Literal

from starlette.requests import HTTPConnection

from treadle.domain.errors import NotFound
from treadle.domain.sandbox import SandboxStatus
from treadle.weaver.api.deps import get_weaver
from treadle.weaver.views import iso

__all__ = [
    "CLIENT_ID",
    "ENVD_VERSION",
    "TEMPLATE_KEY",
    "State",
    "detail",
    "domain_for",
    "e2b_id",
    "listed",
    "sandbox",
    "state_of",
    "treadle_id",
]

# What the SDK gates its envd features on, so the version of the envd half
# treadle serves: 0.3.0 `stdin=False`; 0.4.0 the default user is envd's (no per-request
# `Authorization: Basic user:`); 0.5.2 `close_stdin`; 0.5.7 streamed octet-stream uploads.
# Not 0.6.2 or later: file metadata (xattrs) and watch events carrying entries are not served.
ENVD_VERSION = "0.5.7"
# Deprecated by E2B and required by its models; it names no client here.
CLIENT_ID = "treadle"
# The metadata entry that remembers which template a sandbox was created from.
TEMPLATE_KEY = "e2b.template"

State = Literal["running", "paused"]

# The host routing (`host_routing`) splits `{port}-{id}` on the dash, so E2B ids are treadle's
# without their `sbx_` prefix; both forms are accepted back.
_E2B_ID = re.compile(r"^(?:sbx_)?([a-z0-9]{1,60})$")
_HOST = re.compile(r"^[A-Za-z0-9.-]{1,253}(:[0-9]{1,5})?$")
_GONE = frozenset({SandboxStatus.STOPPING, SandboxStatus.STOPPED, SandboxStatus.FAILED})


def e2b_id(sandbox_id: str) -> str:
    return sandbox_id.removeprefix("sbx_")


def treadle_id(value: str) -> str:
    match = _E2B_ID.match(value)
    if match is None:
        raise NotFound(f"sandbox {value!r} not found")
    return "sbx_" + match.group(1)


def state_of(view: dict[str, Any]) -> State | None:
    """E2B knows running and paused sandboxes only: one asked to stop is gone (every later
    call is a 404), one still starting is running (envd calls wait for it)."""
    if view["desired"] == "stopped" or SandboxStatus(view["status"]) in _GONE:
        return None
    return "paused" if view["status"] == SandboxStatus.PAUSED.value else "running"


def domain_for(conn: HTTPConnection) -> str:
    """Where `{port}-{id}.{domain}` reaches Weaver's host routing: the sandbox domain with
    the port the client reached Weaver on. Without a sandbox domain, Weaver's own address:
    never nothing, for then the SDK would send envd traffic to E2B's cloud."""
    settings = get_weaver(conn).settings
    host = conn.headers.get("host", "")
    if not _HOST.match(host):
        host = f"{settings.host}:{settings.port}"
    if settings.sandbox_domain is None:
        return host
    _, colon, port = host.partition(":")
    return settings.sandbox_domain + (colon + port if colon else "")


def sandbox(view: dict[str, Any], domain: str) -> dict[str, Any]:
    """`Sandbox`, what create and connect answer."""
    answer = {
        **_identity(view),
        # Always: envd access is always checked here, whatever `secure` asked.
        "envdAccessToken": view["access_token"],
        "domain": domain,
    }
    if not view.get("public_ports"):
        # What opens its ports (`e2b-traffic-access-token`) when they are not public.
        answer["trafficAccessToken"] = view["access_token"]
    return answer


def listed(view: dict[str, Any]) -> dict[str, Any]:
    """`ListedSandbox`."""
    resources = view.get("resources") or {}
    return {
        **_identity(view),
        "metadata": {k: v for k, v in view["metadata"].items() if k != TEMPLATE_KEY},
        # Its creation, which a restart on another node (a new incarnation) does not move.
        "startedAt": view["created_at"],
        # A TTL that already fired (or none) leaves the last moment known of it.
        "endAt": view["expires_at"] or view["ended_at"] or view["created_at"],
        "cpuCount": _cores(resources),
        "memoryMB": resources.get("memory_mib", 256),
        "diskSizeMB": resources.get("disk_mib", 1024),
        "state": state_of(view) or "running",
    }


def detail(view: dict[str, Any], domain: str) -> dict[str, Any]:
    """`SandboxDetail`, what `GET /sandboxes/{id}` answers."""
    return {
        **listed(view),
        "envdAccessToken": view["access_token"],
        "allowInternetAccess": bool(view["network"]),
        "domain": domain,
        "lifecycle": {
            "autoResume": False,
            "onTimeout": "pause" if view["on_expiry"] == "pause" else "kill",
        },
    }


def _identity(view: dict[str, Any]) -> dict[str, Any]:
    template = view["metadata"].get(TEMPLATE_KEY)
    found = {
        "sandboxID": e2b_id(view["id"]),
        # A sandbox made through treadle's own API came from no template: its image says more.
        "templateID": template or view["image"] or "base",
        "clientID": CLIENT_ID,
        "envdVersion": ENVD_VERSION,
    }
    if template is not None:
        found["alias"] = template
    return found


def metric(row: Any, view: dict[str, Any]) -> dict[str, Any]:
    """`SandboxMetric`: a usage record of the sandbox (docs/metering.md) as E2B's metrics
    show one interval: its CPU as a share of the cores it reserved, its mean memory."""
    resources = view.get("resources") or {}
    cores = _cores(resources)
    running = max(row.wall_s - row.paused_s, 1e-9)
    used_pct = min(100.0, max(0.0, row.cpu_s / running / cores * 100))
    memory = int(row.memory_gib_s / max(row.wall_s, 1e-9) * 2**30)
    return {
        "timestamp": iso(row.end),
        "timestampUnix": int(row.end),
        "cpuCount": cores,
        "cpuUsedPct": round(used_pct, 2),
        "memUsed": memory,
        "memTotal": int(resources.get("memory_mib") or 0) * 2**20,
        "memCache": 0,
        # What the sandbox's disk holds is not measured yet (docs/metering.md).
        "diskUsed": 0,
        "diskTotal": int(resources.get("disk_mib") or 0) * 2**20,
    }


def _cores(resources: dict[str, Any]) -> int:
    """Whole CPUs, as E2B counts them, for the millicores a sandbox reserved."""
    return max(1, math.ceil(int(resources.get("cpu_millicores") or 1000) / 1000))
