"""Helpers for the suites that drive sandboxes through a real Weaver: the REST calls, the
exec and attach WebSockets, and what the host shows of a sandbox (its processes, its cgroups)
so that a test can check what the API says against what really runs."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from websockets.sync.client import ClientConnection, connect

from support.cluster import Cluster, eventually

__all__ = [
    "Follow",
    "HostProcess",
    "agents_on_host",
    "attached",
    "create",
    "follow",
    "host_process",
    "mounts_under",
    "reaches",
    "run",
    "socket_to",
    "start",
    "status_of",
]

# How long a test waits for one message on a stream before it calls the stream stuck.
RECV_TIMEOUT_S = 30.0


def create(api: httpx.Client, **body: Any) -> dict[str, Any]:
    response = api.post("/v1/sandboxes", json=body)
    assert response.status_code == 201, response.text
    return dict(response.json())


def status_of(api: httpx.Client, sandbox_id: str) -> dict[str, Any]:
    response = api.get(f"/v1/sandboxes/{sandbox_id}")
    assert response.status_code == 200, response.text
    return dict(response.json())


def reaches(
    api: httpx.Client, sandbox_id: str, status: str, timeout: float = 30.0
) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        seen = status_of(api, sandbox_id)
        return seen if seen["status"] == status else None

    return eventually(check, timeout=timeout, what=f"sandbox {sandbox_id} to be {status}")


def run(api: httpx.Client, sandbox_id: str, cmd: list[str] | str, **body: Any) -> dict[str, Any]:
    response = api.post(f"/v1/sandboxes/{sandbox_id}/exec", json={"cmd": cmd, **body})
    assert response.status_code == 200, response.text
    return dict(response.json())


def socket_to(cluster: Cluster, path: str, key: str | None = None) -> ClientConnection:
    url = cluster.url.replace("http", "ws", 1) + path
    return connect(url, additional_headers={"Authorization": f"Bearer {key or cluster.admin_key}"})


def start(ws: ClientConnection, **first: Any) -> dict[str, Any]:
    """Start a process on an exec socket; its `started` message (pid, tag)."""
    ws.send(json.dumps(first))
    started = json.loads(ws.recv(timeout=RECV_TIMEOUT_S))
    assert set(started) == {"started"}, started
    return dict(started["started"])


def attached(ws: ClientConnection) -> dict[str, Any]:
    """The `started` message (pid, tag) an attach to a process begins with."""
    message = json.loads(ws.recv(timeout=RECV_TIMEOUT_S))
    assert set(message) == {"started"}, message
    return dict(message["started"])


@dataclass
class Follow:
    """What a client read of a process's stream: its stdout and its `exit`, if it came."""

    stdout: bytes = b""
    stderr: bytes = b""
    exit: dict[str, Any] | None = None

    @property
    def lines(self) -> list[str]:
        return self.stdout.decode().splitlines()


def follow(ws: ClientConnection, until: bytes | None = None, seen: Follow | None = None) -> Follow:
    """Read the stream until its stdout holds `until` (a complete line), or else until its
    `exit` message; what came either way."""
    seen = seen if seen is not None else Follow()
    while seen.exit is None and (until is None or until not in seen.stdout):
        message = json.loads(ws.recv(timeout=RECV_TIMEOUT_S))
        if "stdout" in message:
            seen.stdout += base64.b64decode(message["stdout"])
        elif "stderr" in message:
            seen.stderr += base64.b64decode(message["stderr"])
        elif "exit" in message:
            seen.exit = message["exit"]
        else:
            raise AssertionError(f"unexpected message on the stream: {message}")
    return seen


# what the host shows


@dataclass(frozen=True)
class HostProcess:
    """A process of this host, told apart from a later one with the same pid by its start
    time (in clock ticks since boot)."""

    pid: int
    started: int

    def alive(self) -> bool:
        now = host_process(self.pid)
        return now is not None and now.started == self.started and not _zombie(self.pid)


def host_process(pid: int) -> HostProcess | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    fields = raw[raw.rfind(b")") + 2 :].split()
    return HostProcess(pid, int(fields[19]))


def _zombie(pid: int) -> bool:
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return True
    return raw[raw.rfind(b")") + 2 :].split()[0] in (b"Z", b"X")


_WORKDIR = re.compile(r"^(?P<root>.+)/(?P<node>[^/]+)/work/(?P<id>sbx_[^/]+)-(?P<inc>\d+)$")


def agents_on_host(root: Path) -> dict[str, list[tuple[str, int, int]]]:
    """The process tier's sandboxes that run on this host under a cluster's `root`: for each
    sandbox id, (node name, incarnation, pid) of every guest agent running it. A guest agent
    is the process that runs the agent's code (`-I -S -c <source>`) with the sandbox's work
    dir as its HOME, which names the node (`<root>/<node>/work/<id>-<incarnation>`)."""
    found: dict[str, list[tuple[str, int, int]]] = {}
    prefix = str(root)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            if b"\0-I\0-S\0-c\0" not in cmdline:
                continue
            environ = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if _zombie(int(entry)):
            continue
        env = dict(item.decode(errors="replace").partition("=")[::2] for item in environ if item)
        match = _WORKDIR.match(env.get("HOME", ""))
        if match is None or match["root"] != prefix or env.get("TREADLE_FUNCTION") != "sandbox":
            continue
        found.setdefault(match["id"], []).append((match["node"], int(match["inc"]), int(entry)))
    return found


def mounts_under(root: Path) -> list[str]:
    """Mount points at or below `root` in this process's mount namespace."""
    prefix = os.path.realpath(root)
    points = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            point = line.split()[4].replace("\\040", " ")
            if point == prefix or point.startswith(prefix + "/"):
                points.append(point)
    return points
