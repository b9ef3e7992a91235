"""Network for namespace-tier sandboxes: given only when the function asks for it and the
operator allows it, through slirp4netns in the sandbox's own network namespace, and then
reaching other hosts but never the host's loopback. slirp4netns never outlives its attempt,
nor a Shuttle killed mid-attempt.

"Other hosts" are played by this host's own non-loopback address, the one traffic to the
outside would leave from: the test listens there, and on 127.0.0.1 for what must stay out
of reach.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import pytest

from support.runtimes import GATED, PY, Gate, Run, run, shuttle_settings, spec, tag, wait_ended
from treadle.shuttle.reaper import reap_orphans
from treadle.shuttle.runtimes import NamespaceRuntime, slirp
from treadle.shuttle.runtimes.namespace import NO_NETWORK, Unavailable


def unavailable(reason: str) -> NoReturn:
    """Skip, except in CI, whose test command installs bubblewrap and slirp4netns: there a
    tier or a network that does not work is a failure."""
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(autouse=True)
def tools() -> None:
    for program in ("bwrap", "slirp4netns"):
        if shutil.which(program) is None:
            unavailable(f"{program} is not installed (scripts/test installs it)")


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


def namespace_runtime(home: Path, **settings: Any) -> NamespaceRuntime:
    try:
        runtime = NamespaceRuntime(shuttle_settings(home, **settings))
    except Unavailable as exc:
        unavailable(f"the namespace tier is not available here: {exc}")
    reason = runtime.probe()
    if reason is not None:
        unavailable(f"the namespace tier does not work here: {reason}")
    return runtime


@pytest.fixture
def allowed(home: Path) -> NamespaceRuntime:
    runtime = namespace_runtime(home, allow_network=True)
    if not runtime.gives_network:
        unavailable("slirp4netns does not work here (see the log)")
    return runtime


@pytest.fixture
def refused(home: Path) -> NamespaceRuntime:
    runtime = namespace_runtime(home)
    assert not runtime.gives_network
    return runtime


def host_address() -> str:
    """This host's address towards other hosts (the default route's source)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("203.0.113.1", 9))  # a route lookup: nothing is sent
            address: str = probe.getsockname()[0]
        except OSError:
            address = socket.gethostbyname(socket.gethostname())
    if address.startswith("127.") or address == "0.0.0.0":
        pytest.skip("this host has no address but loopback")
    return address


@dataclass
class Listener:
    """A TCP server of the test's: answers "ping" with "pong" and counts its connections."""

    server: asyncio.Server
    connections: list[str] = field(default_factory=list)

    @property
    def port(self) -> int:
        port: int = self.server.sockets[0].getsockname()[1]
        return port


@contextlib.asynccontextmanager
async def listening(address: str) -> AsyncIterator[Listener]:
    listener: Listener

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        listener.connections.append(writer.get_extra_info("peername")[0])
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            if await reader.readexactly(4) == b"ping":
                writer.write(b"pong")
                await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, address, 0)
    listener = Listener(server)
    async with server:
        yield listener


# The program's side: connect(what, address, port) records "pong" when the exchange
# worked, or the name of the error; then what the sandbox has for network.
PROBE = """
import errno, json, socket
seen = {}
def connect(what, address, port):
    try:
        with socket.create_connection((address, port), timeout=5) as conn:
            conn.sendall(b"ping")
            conn.settimeout(5)
            seen[what] = conn.recv(4).decode()
    except OSError as exc:
        seen[what] = errno.errorcode.get(exc.errno, str(exc))
def interfaces():
    with open("/proc/net/dev") as f:
        return sorted(line.split(":")[0].strip() for line in f.readlines()[2:])
"""
REPORT = """
import os
seen["interfaces"] = interfaces()
seen["fds"] = [fd for fd in range(4, 256) if os.path.exists(f"/proc/self/fd/{fd}")]
try:
    seen["resolv.conf"] = open("/etc/resolv.conf").read()
except OSError as exc:
    seen["resolv.conf"] = errno.errorcode[exc.errno]
print(json.dumps(seen))
"""


def report(result: Run) -> dict[str, Any]:
    assert (result.status.exit_code, result.status.reason) == (0, None), result.text("stderr")
    seen: dict[str, Any] = json.loads(result.text("stdout"))
    return seen


def slirps_of(parent: int) -> list[int]:
    """The slirp4netns processes (zombies too) whose parent is `parent`."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        if comm == "slirp4netns" and ppid == parent:
            found.append(int(name))
    return found


@pytest.fixture(autouse=True)
def no_slirp_left() -> Iterator[None]:
    assert slirps_of(os.getpid()) == []
    yield
    assert slirps_of(os.getpid()) == []


async def test_asked_and_allowed_reaches_other_hosts_but_not_the_hosts_loopback(
    allowed: NamespaceRuntime, home: Path
) -> None:
    outside = host_address()
    async with (
        listening(outside) as other_host,
        listening("127.0.0.1") as loopback,
        listening("0.0.0.0") as everywhere,
    ):
        code = (
            PROBE
            + f"""
# First thing: the network is up before the program runs.
connect("other host", {outside!r}, {other_host.port})
connect("127.0.0.1", "127.0.0.1", {loopback.port})
connect("gateway to loopback", "10.0.2.2", {loopback.port})
connect("gateway to any address", "10.0.2.2", {everywhere.port})
connect("dns address", "10.0.2.3", {loopback.port})
"""
            + REPORT
        )

        seen = report(await run(allowed, spec([PY, "-c", code], network=True), home / "w"))

        assert seen.pop("other host") == "pong"
        assert other_host.connections != []
        # 127.0.0.1 is the sandbox's own loopback; 10.0.2.2 would be the host's.
        assert seen.pop("127.0.0.1") == "ECONNREFUSED"
        assert seen.pop("gateway to loopback") != "pong"
        assert seen.pop("gateway to any address") != "pong"
        assert seen.pop("dns address") != "pong"
        assert loopback.connections == []
        assert everywhere.connections == []
        assert seen == {
            "interfaces": ["lo", slirp.INTERFACE],
            "resolv.conf": "nameserver 10.0.2.3\n",
            "fds": [],  # nothing of the network's set-up is left open in the program
        }


async def test_asked_but_not_allowed_is_refused_with_the_reason(
    refused: NamespaceRuntime, home: Path
) -> None:
    result = await run(refused, spec(["/bin/true"], network=True), home / "w")

    assert (result.status.exit_code, result.status.reason) == (None, "spawn_failed")
    assert result.output == [("stderr", f"treadle: {NO_NETWORK}\n".encode())]


async def test_without_slirp4netns_network_is_refused_however_allowed(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "bin"
    path.mkdir()
    (path / "bwrap").symlink_to(shutil.which("bwrap") or "")
    monkeypatch.setenv("PATH", str(path))
    runtime = namespace_runtime(home, allow_network=True)

    assert not runtime.gives_network
    result = await run(runtime, spec(["/bin/true"], network=True), home / "w")
    assert result.output == [("stderr", f"treadle: {NO_NETWORK}\n".encode())]


@pytest.mark.parametrize("operator_allows", [True, False], ids=["allowed", "refused"])
async def test_not_asked_means_no_network(operator_allows: bool, home: Path) -> None:
    runtime = namespace_runtime(home, allow_network=operator_allows)
    outside = host_address()
    async with listening(outside) as other_host:
        code = PROBE + f'connect("other host", {outside!r}, {other_host.port})\n' + REPORT

        seen = report(await run(runtime, spec([PY, "-c", code]), home / "w"))

        assert seen == {
            "other host": "ENETUNREACH",
            "interfaces": ["lo"],
            "resolv.conf": "ENOENT",
            "fds": [],
        }
        assert other_host.connections == []


async def test_slirp4netns_ends_with_a_killed_attempt(
    allowed: NamespaceRuntime, home: Path
) -> None:
    gate = Gate()
    code = GATED + "print('up', flush=True)\nwait()\n"
    handle = await allowed.start(spec([PY, "-c", code, gate.tag], network=True), home / "w")
    try:
        async with asyncio.timeout(20):
            assert await anext(handle.output()) == ("stdout", b"up\n")
            running = slirps_of(os.getpid())
            assert len(running) == 1
            handle.kill()
            assert [item async for item in handle.output()] == []
            status = await handle.wait()
    finally:
        gate.close()

    assert status.reason == "cancelled"
    assert slirps_of(os.getpid()) == []


FAKE_SLIRP = """#!/bin/sh
echo "$*" >> {log}
case "$*" in
  *--enable-seccomp*) echo "seccomp is not for this host" >&2; exit 1 ;;
esac
exec {real} "$@"
"""


def fake_slirp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, script: str) -> Path:
    """Put a `slirp4netns` of the test's first on PATH; returns where it logs its runs."""
    path = tmp_path / "bin"
    path.mkdir()
    fake = path / "slirp4netns"
    log = tmp_path / "slirp4netns.log"
    fake.write_text(script.format(real=shutil.which("slirp4netns"), log=log))
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{path}:{os.environ['PATH']}")
    return log


async def test_a_failing_slirp4netns_fails_the_start_with_its_words(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_slirp(tmp_path, monkeypatch, "#!/bin/sh\necho 'cannot do it' >&2\nexit 1\n")
    runtime = NamespaceRuntime(shuttle_settings(home, allow_network=True))  # not probed
    assert runtime.gives_network
    fds_before = sorted(os.listdir("/proc/self/fd"))

    result = await run(runtime, spec(["/bin/true"], network=True), home / "w")

    assert (result.status.exit_code, result.status.reason) == (None, "spawn_failed")
    assert result.text("stderr") == (
        "treadle: slirp4netns failed to set up the network: cannot do it\n"
    )
    assert sorted(os.listdir("/proc/self/fd")) == fds_before
    reap_orphans()


async def test_a_slirp4netns_that_never_gets_ready_fails_the_start(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_slirp(tmp_path, monkeypatch, "#!/bin/sh\nexec sleep 60\n")
    monkeypatch.setattr(slirp, "_READY_TIMEOUT_S", 0.5)
    runtime = NamespaceRuntime(shuttle_settings(home, allow_network=True))

    result = await run(runtime, spec(["/bin/true"], network=True), home / "w")

    assert (result.status.exit_code, result.status.reason) == (None, "spawn_failed")
    assert "did not set up the network" in result.text("stderr")


async def test_the_probe_drops_the_seccomp_filter_of_slirp4netns_where_it_fails(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runs = fake_slirp(tmp_path, monkeypatch, FAKE_SLIRP)

    runtime = namespace_runtime(home, allow_network=True)

    assert runtime.gives_network
    outside = host_address()
    async with listening(outside) as other_host:
        code = PROBE + f'connect("other host", {outside!r}, {other_host.port})\n' + REPORT
        seen = report(await run(runtime, spec([PY, "-c", code], network=True), home / "w"))
    assert seen["other host"] == "pong"
    with_seccomp = ["--enable-seccomp" in line.split() for line in runs.read_text().splitlines()]
    assert with_seccomp == [True, False, False]  # the probe's two trials, then the execution


SHUTTLE = """
import asyncio, sys
from pathlib import Path
from treadle.domain.resources import Resources, Tier
from treadle.protocol.messages import AssignSpec
from treadle.shuttle.runtimes import NamespaceRuntime
from treadle.shuttle.settings import ShuttleSettings

async def main():
    home = Path(sys.argv[1])
    settings = ShuttleSettings(weaver_url="http://127.0.0.1:9", home=home, allow_network=True)
    runtime = NamespaceRuntime(settings)
    spec = AssignSpec(
        id="ex", attempt=1, tenant_id="t", function="f", version=1, timeout_s=60,
        argv=["/usr/bin/python3", "-c", "import time; print('up', flush=True); time.sleep(60)",
              sys.argv[2]],
        resources=Resources(), isolation=Tier.NAMESPACE, network=True,
    )
    handle = await runtime.start(spec, home / "work")
    async for _ in handle.output():
        print("running", flush=True)
        await asyncio.sleep(60)

asyncio.run(main())
"""


@pytest.fixture
def killed_shuttle(home: Path) -> Iterator[list[int]]:
    """A Shuttle process SIGKILLed while an attempt with network ran; yields the pids of the
    slirp4netns it had started."""
    namespace_runtime(home)  # skips where the tier does not work; makes this a subreaper
    shuttle = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(SHUTTLE), str(home), tag()],
        stdout=subprocess.PIPE,
    )
    try:
        assert shuttle.stdout is not None
        assert shuttle.stdout.readline() == b"running\n"
        left = slirps_of(shuttle.pid)
        os.kill(shuttle.pid, signal.SIGKILL)
        shuttle.wait()
        yield left
    finally:
        shuttle.kill()
        shuttle.wait()
        if shuttle.stdout is not None:
            shuttle.stdout.close()


async def test_slirp4netns_dies_with_a_killed_shuttle(killed_shuttle: list[int]) -> None:
    assert len(killed_shuttle) == 1
    assert await wait_ended(killed_shuttle[0])
    reap_orphans()  # it ended an orphan of this process, a subreaper
