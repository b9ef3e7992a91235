"""Network for namespace-tier sandboxes: given only when the function asks for it and the
operator allows it, through slirp4netns in the sandbox's own network namespace, and then
reaching other hosts but never this host (its loopback or its other addresses), its cloud's
metadata service, or Weaver. slirp4netns never outlives its attempt, nor a Shuttle killed
mid-attempt.

"Another host" is a network namespace that the test makes, joined to this host by a veth
pair (`OTHER_HOST`): the test listens there, and on this host's own addresses and 127.0.0.1
for what must stay out of reach. Destinations no packet may be sent to (the metadata
service) are checked by a UDP `connect`, which only looks the route up.
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
import threading
import uuid
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


OTHER_HOST = "198.51.100.2"  # TEST-NET-2: nobody's real address
_THIS_SIDE = "198.51.100.1"
_CLONE_NEWNET = 0x40000000


@pytest.fixture
def other_host() -> Iterator[str]:
    """A network namespace joined to this one by a veth pair: a host of the test's own at
    OTHER_HOST. Yields the namespace's name."""
    if shutil.which("ip") is None or os.geteuid() != 0:
        pytest.skip("making a network namespace needs ip and root")
    name = f"tr{uuid.uuid4().hex[:8]}"
    here, there = f"{name}h", f"{name}n"
    commands = [
        ["ip", "netns", "add", name],
        ["ip", "link", "add", here, "type", "veth", "peer", "name", there, "netns", name],
        ["ip", "addr", "add", f"{_THIS_SIDE}/30", "dev", here],
        ["ip", "link", "set", here, "up"],
        ["ip", "-n", name, "addr", "add", f"{OTHER_HOST}/30", "dev", there],
        ["ip", "-n", name, "link", "set", there, "up"],
        ["ip", "-n", name, "link", "set", "lo", "up"],
    ]
    try:
        for command in commands:
            subprocess.run(command, check=True, capture_output=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)
        subprocess.run(["ip", "link", "del", here], check=False, capture_output=True)


def socket_in(namespace: str, address: str) -> socket.socket:
    """A listening TCP socket on `address` in network namespace `namespace`: made by a thread
    that enters the namespace (a socket belongs to the namespace it was made in)."""
    made: list[socket.socket | BaseException] = []

    def make() -> None:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        try:
            fd = os.open(f"/run/netns/{namespace}", os.O_RDONLY | os.O_CLOEXEC)
            try:
                if libc.setns(fd, _CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns")
            finally:
                os.close(fd)
            sock = socket.create_server((address, 0))
            sock.setblocking(False)
            made.append(sock)
        except BaseException as exc:
            made.append(exc)

    thread = threading.Thread(target=make)  # it ends in the namespace, never to be reused
    thread.start()
    thread.join()
    (result,) = made
    if isinstance(result, BaseException):
        raise result
    return result


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
async def listening(address: str, namespace: str | None = None) -> AsyncIterator[Listener]:
    listener: Listener

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        listener.connections.append(writer.get_extra_info("peername")[0])
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            if await reader.readexactly(4) == b"ping":
                writer.write(b"pong")
                await writer.drain()
        writer.close()

    if namespace is None:
        server = await asyncio.start_server(serve, address, 0)
    else:
        server = await asyncio.start_server(serve, sock=socket_in(namespace, address))
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
def route(what, address):
    # connect() of a UDP socket looks the route up and sends nothing.
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((address, 80))
            seen[what] = "routed"
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


def reach_code(
    this_host: str,
    elsewhere: Listener,
    on_this_host: Listener,
    everywhere: Listener,
    loopback: Listener,
) -> str:
    """A program that tries every destination a networked sandbox must or must not reach,
    and reports what it managed (`report`)."""
    return (
        PROBE
        + f"""
# First thing: the network is up before the program runs.
connect("other host", {OTHER_HOST!r}, {elsewhere.port})
connect("this host", {this_host!r}, {on_this_host.port})
connect("this host, any address", {this_host!r}, {everywhere.port})
connect("127.0.0.1", "127.0.0.1", {loopback.port})
connect("gateway to loopback", "10.0.2.2", {loopback.port})
connect("gateway to any address", "10.0.2.2", {everywhere.port})
connect("dns address", "10.0.2.3", {loopback.port})
route("metadata service", "169.254.169.254")
route("link-local", "169.254.1.1")
route("other host's route", {OTHER_HOST!r})
"""
        + REPORT
    )


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


async def test_asked_and_allowed_reaches_other_hosts_but_not_this_one(
    allowed: NamespaceRuntime, home: Path, other_host: str
) -> None:
    this_host = host_address()
    async with (
        listening(OTHER_HOST, other_host) as elsewhere,
        listening(this_host) as on_this_host,
        listening("127.0.0.1") as loopback,
        listening("0.0.0.0") as everywhere,
    ):
        code = reach_code(this_host, elsewhere, on_this_host, everywhere, loopback)

        seen = report(await run(allowed, spec([PY, "-c", code], network=True), home / "w"))

        assert seen.pop("other host") == "pong"
        assert elsewhere.connections != []
        # This host's own addresses and its cloud's are fenced off in the sandbox's routes.
        assert seen.pop("this host") == "EACCES"
        assert seen.pop("this host, any address") == "EACCES"
        assert seen.pop("metadata service") == "EACCES"
        assert seen.pop("link-local") == "EACCES"
        assert seen.pop("other host's route") == "routed"
        # 127.0.0.1 is the sandbox's own loopback; 10.0.2.2 would be the host's.
        assert seen.pop("127.0.0.1") == "ECONNREFUSED"
        assert seen.pop("gateway to loopback") != "pong"
        assert seen.pop("gateway to any address") != "pong"
        assert seen.pop("dns address") != "pong"
        assert on_this_host.connections == []
        assert loopback.connections == []
        assert everywhere.connections == []
        assert seen == {
            "interfaces": ["lo", slirp.INTERFACE],
            "resolv.conf": "nameserver 10.0.2.3\n",
            "fds": [],  # nothing of the network's set-up is left open in the program
        }


async def test_weaver_is_out_of_reach_wherever_it_runs(home: Path, other_host: str) -> None:
    # Weaver on another host: the sandbox reaches that host's other services, not Weaver's.
    runtime = namespace_runtime(home, allow_network=True, weaver_url=f"http://{OTHER_HOST}:8700")
    if not runtime.gives_network:
        unavailable("slirp4netns does not work here (see the log)")
    async with listening(OTHER_HOST, other_host) as weaver_host:
        code = (
            PROBE
            + f"""
connect("weaver's host", {OTHER_HOST!r}, {weaver_host.port})
print(json.dumps(seen))
"""
        )

        seen = report(await run(runtime, spec([PY, "-c", code], network=True), home / "w"))

        assert seen == {"weaver's host": "EACCES"}
        assert weaver_host.connections == []


def mounted(path: str) -> bool:
    return os.stat(path).st_dev != os.stat(os.path.dirname(path)).st_dev


async def test_a_networked_sandbox_leaves_the_hosts_mounts_alone(
    allowed: NamespaceRuntime, home: Path, other_host: str
) -> None:
    # `ip netns add` keeps the namespace in a shared mount, as systemd hosts mount / itself:
    # slirp4netns, run as root, once unmounted such mounts as it built its own sandbox.
    namespace = f"/run/netns/{other_host}"
    assert mounted(namespace)

    result = await run(allowed, spec(["/bin/true"], network=True), home / "w")

    assert (result.status.exit_code, result.status.reason) == (0, None)
    assert mounted(namespace)


def test_the_fence_covers_link_local_this_hosts_addresses_and_weaver() -> None:
    fib_trie = textwrap.dedent(
        """\
        Local:
          +-- 0.0.0.0/0 3 0 5
             |-- 127.0.0.1
                /32 host LOCAL
             |-- 192.0.2.2
                /32 host LOCAL
             |-- 192.0.2.255
                /32 link BROADCAST
        """
    )

    assert slirp.fenced(["203.0.113.7", "127.0.0.1"], fib_trie) == [
        "169.254.0.0/16",
        "192.0.2.2/32",
        "203.0.113.7/32",
    ]


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
    # What the tier itself needs (bubblewrap), and what the network needs but slirp4netns.
    for program in ("bwrap", "nsenter", "ip", "unshare"):
        (path / program).symlink_to(shutil.which(program) or "")
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
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, other_host: str
) -> None:
    runs = fake_slirp(tmp_path, monkeypatch, FAKE_SLIRP)

    runtime = namespace_runtime(home, allow_network=True)

    assert runtime.gives_network
    async with listening(OTHER_HOST, other_host) as elsewhere:
        code = PROBE + f'connect("other host", {OTHER_HOST!r}, {elsewhere.port})\n' + REPORT
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
