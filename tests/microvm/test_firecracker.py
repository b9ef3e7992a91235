"""The Firecracker driver, held to Firecracker's published API by a stand-in for the binary
(`support.firecracker_standin`: the API, its phase rules and the vsock handshake as
Firecracker has them; QEMU as the VMM behind them, since Firecracker cannot run here).
Its guest is the real guest image, and its agent answers through the vsock handshake."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from microvm.test_boot import run
from support import firecracker_standin as standin
from support.processes import pids_with
from treadle.guest import vsock_stdio
from treadle.shuttle.live.link import GuestLink
from treadle.shuttle.microvm import firecracker
from treadle.shuttle.microvm.firecracker import (
    ApiError,
    Drive,
    FirecrackerApi,
    FirecrackerError,
    connect_vsock,
    jail_root,
    jailer_argv,
)
from treadle.shuttle.microvm.image import GuestImage, build

pytestmark = pytest.mark.microvm

# Generous: software emulation on a busy 2-core machine boots in 3-4 s.
BOOT_S = 120.0


def start_standin(directory: Path) -> tuple[subprocess.Popen[bytes], Path]:
    """The stand-in, idle on an API socket in `directory`."""
    sock = directory / "api.sock"
    process = subprocess.Popen(
        [sys.executable, standin.__file__, "--api-sock", str(sock), "--id", "vm-1"],
        stdin=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while not sock.exists():
        assert process.poll() is None, "the stand-in ended before making its socket"
        assert time.monotonic() < deadline, "the stand-in made no socket"
        time.sleep(0.02)
    return process, sock


def gone(workdir: Path) -> bool:
    """Nothing left of a guest run in `workdir`: no process naming it, nor it."""
    return not pids_with(str(workdir)) and not workdir.exists()


def stop(process: subprocess.Popen[bytes]) -> None:
    process.kill()
    process.wait()


@pytest.fixture(scope="module")
def idle(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A stand-in never started: every request sent to it here is refused."""
    process, sock = start_standin(tmp_path_factory.mktemp("idle"))
    yield sock
    stop(process)


@pytest.fixture
def fresh(tmp_path: Path) -> Iterator[Path]:
    process, sock = start_standin(tmp_path)
    yield sock
    stop(process)


@pytest.fixture(scope="module")
def program(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(standin.install(tmp_path_factory.mktemp("bin")))


async def refusal(call: Awaitable[object], status: int = 400) -> ApiError:
    with pytest.raises(ApiError) as caught:
        await call
    assert caught.value.status == status
    return caught.value


def body(value: object) -> bytes:
    return json.dumps(value).encode()


# (a) The API's rules, before any start.

MACHINE = {"vcpu_count": 1, "mem_size_mib": 128}
DESERIALIZE = "An error occurred when deserializing the json body of a request: "


@pytest.mark.parametrize(
    ("method", "path", "sent", "fault"),
    [
        ("PUT", "/machine-config", b"{", DESERIALIZE),
        ("PUT", "/machine-config", b"[1]", DESERIALIZE + "invalid type: sequence"),
        ("PUT", "/machine-config", body({**MACHINE, "cpus": 2}), "unknown field `cpus`"),
        ("PUT", "/machine-config", body({"vcpu_count": 1}), "missing field `mem_size_mib`"),
        (
            "PUT",
            "/machine-config",
            body({**MACHINE, "vcpu_count": "1"}),
            'invalid type: string "1", expected u8',
        ),
        (
            "PUT",
            "/machine-config",
            body({**MACHINE, "vcpu_count": 300}),
            "invalid value: integer `300`, expected u8",
        ),
        (
            "PUT",
            "/machine-config",
            body({**MACHINE, "vcpu_count": 0}),
            "Machine config error: The number of vCPUs must be greater than 0",
        ),
        (
            "PUT",
            "/machine-config",
            body({**MACHINE, "vcpu_count": 3, "smt": True}),
            "must be 1 or an even number if SMT is enabled",
        ),
        ("PUT", "/machine-config", body({**MACHINE, "mem_size_mib": 0}), "The memory size (MiB)"),
        ("PUT", "/boot-source", body({}), "missing field `kernel_image_path`"),
        (
            "PUT",
            "/boot-source",
            body({"kernel_image_path": "/nonexistent/vmlinux"}),
            "Boot source error: The kernel file cannot be opened: No such file or directory "
            "(os error 2)",
        ),
        (
            "PUT",
            "/boot-source",
            body({"kernel_image_path": "/dev/null", "initrd": "/dev/null"}),
            "unknown field `initrd`, expected one of `kernel_image_path`, `initrd_path`, "
            "`boot_args`",
        ),
        ("PUT", "/actions", body({"action_type": "Reboot"}), "unknown variant `Reboot`"),
        ("PUT", "/actions", body({"action_type": "InstanceStart", "now": True}), "unknown field"),
        # The body is read before the phase is: a bad one is refused as bad, not as early.
        (
            "PATCH",
            "/vm",
            body({"state": "Stopped"}),
            "unknown variant `Stopped`, expected `Paused` or `Resumed`",
        ),
        ("PUT", "/vsock", body({"guest_cid": 3}), "missing field `uds_path`"),
        (
            "PUT",
            "/drives/rootfs",
            body({"drive_id": "other", "is_root_device": False}),
            "The id from the path does not match the id from the body!",
        ),
        (
            "PUT",
            "/drives/root-fs",
            body({"drive_id": "root-fs", "is_root_device": False}),
            "API Resource IDs can only contain alphanumeric characters and underscores.",
        ),
        (
            "PUT",
            "/drives",
            body({"drive_id": "x", "is_root_device": False}),
            "The ID cannot be empty.",
        ),
        ("PUT", "/nowhere", body({}), "Invalid request method and/or path: PUT nowhere."),
        ("GET", "/nowhere", None, "Invalid request method and/or path: GET nowhere."),
        ("PATCH", "/actions", body({}), "Invalid request method and/or path: PATCH actions."),
        ("PUT", "/machine-config", None, "Empty PUT request."),
        ("PATCH", "/vm", None, "Empty PATCH request."),
        ("GET", "/", body({}), "GET request cannot have a body."),
        ("PUT", "/logger", body({}), "The stand-in does not model PUT /logger."),
        ("PUT", "/machine-config", b"{" + b" " * 60000 + b"}", "larger than the limit of 51200"),
    ],
)
async def test_the_stand_in_refuses_what_firecracker_refuses(
    idle: Path, method: str, path: str, sent: bytes | None, fault: str
) -> None:
    error = await refusal(FirecrackerApi(idle).request(method, path, sent))
    assert fault in error.fault_message
    assert (error.method, error.path) == (method, path)


async def test_before_the_start_the_configuration_is_taken_and_runtime_calls_refused(
    fresh: Path, tmp_path: Path
) -> None:
    api = FirecrackerApi(fresh)
    info = await api.describe()
    assert info == {
        "id": "vm-1",
        "state": "Not started",
        "vmm_version": standin.VERSION,
        "app_name": "Firecracker",
    }
    assert await api.request("GET", "/machine-config") == {
        "vcpu_count": 1,
        "mem_size_mib": 128,
        "smt": False,
        "track_dirty_pages": False,
        "huge_pages": "None",
    }
    error = await refusal(api.start())
    assert error.fault_message == (
        "Start microvm error: Cannot start microvm without kernel configuration."
    )
    for runtime_only in (api.pause(), api.resume(), api.ctrl_alt_del()):
        assert (await refusal(runtime_only)).fault_message == standin.PRE_BOOT
    kernel, disk, other = tmp_path / "vmlinux", tmp_path / "disk", tmp_path / "other"
    for path in (kernel, disk, other):
        path.write_bytes(b"\0" * 4096)
    await api.machine_config(2, 256)
    await api.boot_source(kernel, None, "console=ttyS0")
    await api.boot_source(kernel, kernel, "console=ttyS0")  # again: replaced, not refused
    await api.drive(Drive("rootfs", disk, root=True))
    await api.drive(Drive("rootfs", disk, read_only=False, root=True))  # the same id: updated
    error = await refusal(api.drive(Drive("scratch", other, root=True)))
    assert error.fault_message == "Drive config error: A root block device already exists!"
    await api.drive(Drive("scratch", other))
    error = await refusal(api.vsock(3, tmp_path))  # a path taken: the backend cannot bind
    assert error.fault_message.startswith("Vsock config error: ")
    uds = tmp_path / "v.sock"
    await api.vsock(3, uds)
    assert uds.exists()  # bound when configured, as Firecracker's backend is
    await api.vsock(4, uds)  # again: the old socket is replaced
    config = await api.request("GET", "/vm/config")
    assert config["machine-config"]["vcpu_count"] == 2
    assert [d["drive_id"] for d in config["drives"]] == ["rootfs", "scratch"]
    assert config["vsock"] == {"guest_cid": 4, "uds_path": str(uds)}
    assert (await api.describe())["state"] == "Not started"


def test_an_api_socket_already_there_is_not_taken_over(tmp_path: Path) -> None:
    sock = tmp_path / "api.sock"
    sock.write_bytes(b"")
    done = subprocess.run(
        [sys.executable, standin.__file__, "--api-sock", str(sock)],
        capture_output=True,
        timeout=30,
    )
    assert done.returncode == 1
    assert b"Failed to open the API socket" in done.stderr


# (b) A guest booted through the driver, its agent reached over the vsock handshake.


async def test_a_guest_booted_through_the_api_answers_over_vsock_and_leaves_nothing(
    image: GuestImage, program: str, tmp_path: Path
) -> None:
    disk = tmp_path / "disk"
    disk.write_bytes(b"treadle!" * 128 * 1024)  # 1 MiB: 2048 sectors
    workdir = tmp_path / "vm"
    vm = await firecracker.boot(
        image,
        workdir,
        memory_mib=192,
        firecracker=program,
        drives=[Drive("scratch", disk)],
        timeout_s=BOOT_S,
    )
    broken: list[str] = []
    fd = vm.channel.fileno()
    link = GuestLink(os.dup(fd), os.dup(fd), on_broken=broken.append)
    try:
        ready = await asyncio.wait_for(link.ready(), BOOT_S)
        assert (ready.pid, ready.uid) == (1, 0)
        out, code = await run(link, ["/bin/sh", "-c", "cat /sys/block/vda/size /sys/block/vda/ro"])
        assert (code, out.split()) == (0, [b"2048", b"1"])  # the drive, read-only
        assert pids_with(str(workdir))

        api = vm.api
        assert (await api.describe())["state"] == "Running"
        for pre_boot_only in (
            api.machine_config(1, 128),
            api.boot_source(image.kernel, image.initrd, ""),
            api.drive(Drive("other", disk)),
            api.vsock(3, tmp_path / "other.sock"),
            api.start(),
        ):
            assert (await refusal(pre_boot_only)).fault_message == standin.POST_BOOT
        # The guest's port took its one connection: a second finds nobody listening.
        with pytest.raises(FirecrackerError, match="did not listen"):
            await connect_vsock(workdir / "vsock.sock", timeout_s=0.5)

        await api.pause()
        assert (await api.describe())["state"] == "Paused"
        await api.resume()
        assert (await api.describe())["state"] == "Running"
        out, code = await run(link, ["/bin/echo", "after"])
        assert (code, out) == (0, b"after\n")
        await api.ctrl_alt_del()  # taken once started (what the guest makes of it is its own)
    finally:
        link.close()
        vm.channel.close()
    # The host's end closed: the agent's input ends, the guest ends, and so does the VMM.
    assert await asyncio.wait_for(vm.wait(), BOOT_S) == 0
    await vm.close()
    assert not broken
    assert gone(workdir)


# (c) What fails fails as the driver's error, in time, leaving nothing.


async def expect_failure(
    boot: Callable[[], Awaitable[object]], workdir: Path, within_s: float
) -> FirecrackerError:
    started = time.monotonic()
    with pytest.raises(FirecrackerError) as caught:
        await asyncio.wait_for(boot(), within_s + 30)
    assert time.monotonic() - started < within_s
    assert gone(workdir)
    return caught.value


async def test_a_vmm_that_exits_at_once_is_a_firecracker_error(tmp_path: Path) -> None:
    image = GuestImage(tmp_path / "vmlinux", tmp_path / "initrd", "none")
    workdir = tmp_path / "vm"
    error = await expect_failure(
        lambda: firecracker.boot(image, workdir, firecracker="/bin/false", timeout_s=30),
        workdir,
        10,
    )
    assert "exited (1) before its API answered" in str(error)


async def test_a_vmm_that_never_answers_is_given_up_on(tmp_path: Path) -> None:
    silent = tmp_path / "firecracker"
    silent.write_text(
        f"#!/bin/sh\nexec {sys.executable} -c 'import time; time.sleep(999)' \"$@\"\n"
    )
    silent.chmod(0o755)
    image = GuestImage(tmp_path / "vmlinux", tmp_path / "initrd", "none")
    workdir = tmp_path / "vm"
    error = await expect_failure(
        lambda: firecracker.boot(image, workdir, firecracker=str(silent), timeout_s=1.5),
        workdir,
        10,
    )
    assert "did not answer" in str(error)


async def test_a_refused_step_is_the_api_s_error_with_its_status_and_fault(
    program: str, tmp_path: Path
) -> None:
    image = GuestImage(tmp_path / "missing", tmp_path / "initrd", "none")
    workdir = tmp_path / "vm"
    error = await expect_failure(
        lambda: firecracker.boot(image, workdir, firecracker=program, timeout_s=30), workdir, 20
    )
    assert isinstance(error, ApiError)
    assert (error.method, error.path, error.status) == ("PUT", "/boot-source", 400)
    assert error.fault_message.startswith("Boot source error: The kernel file cannot be opened")


async def test_a_guest_that_cannot_boot_ends_the_boot_with_what_the_vmm_said(
    image: GuestImage, program: str, tmp_path: Path
) -> None:
    not_a_kernel = tmp_path / "vmlinux"
    not_a_kernel.write_bytes(b"\x7fELF but not a kernel")
    workdir = tmp_path / "vm"
    broken = GuestImage(not_a_kernel, image.initrd, "broken")
    error = await expect_failure(
        lambda: firecracker.boot(broken, workdir, firecracker=program, timeout_s=BOOT_S),
        workdir,
        30,
    )
    assert "kernel" in str(error).lower()


async def test_a_guest_that_never_listens_is_given_up_on(
    package: Path, program: str, tmp_path: Path
) -> None:
    mute = build(package, agent=b"import time\ntime.sleep(3600)\n")
    workdir = tmp_path / "vm"
    error = await expect_failure(
        lambda: firecracker.boot(mute, workdir, memory_mib=192, firecracker=program, timeout_s=6),
        workdir,
        25,
    )
    assert "did not listen on vsock port 52 in time" in str(error)


# (d) The jailer's command line.


def test_the_jailer_command_line() -> None:
    argv = jailer_argv(
        "/usr/local/bin/jailer",
        "/usr/local/bin/firecracker",
        vm_id="sbx-42",
        uid=10042,
        gid=10042,
        chroot_base=Path("/srv/jailer"),
        memory_limit_bytes=512 << 20,
        netns=Path("/var/run/netns/sbx-42"),
    )
    assert argv == [
        "/usr/local/bin/jailer",
        "--id",
        "sbx-42",
        "--exec-file",
        "/usr/local/bin/firecracker",
        "--uid",
        "10042",
        "--gid",
        "10042",
        "--chroot-base-dir",
        "/srv/jailer",
        "--cgroup-version",
        "2",
        "--cgroup",
        "memory.max=536870912",
        "--netns",
        "/var/run/netns/sbx-42",
        "--new-pid-ns",
        "--",
        "--api-sock",
        "/run/firecracker.socket",
    ]
    v1 = jailer_argv(
        "jailer",
        "/opt/fc/firecracker-v1.7.0-x86_64",
        vm_id="a",
        uid=1,
        gid=2,
        memory_limit_bytes=1 << 20,
        cgroup_version=1,
        new_pid_ns=False,
    )
    assert "memory.limit_in_bytes=1048576" in v1 and "--new-pid-ns" not in v1
    assert "--netns" not in v1
    assert v1[v1.index("--") :] == ["--", "--api-sock", "/run/firecracker.socket"]
    assert jail_root(Path("/srv/jailer"), "/usr/local/bin/firecracker", "sbx-42") == Path(
        "/srv/jailer/firecracker/sbx-42/root"
    )


@pytest.mark.parametrize(
    ("firecracker_path", "vm_id", "uid"),
    [
        ("/usr/bin/firecracker", "has space", 1),
        ("/usr/bin/firecracker", "x" * 65, 1),
        ("/usr/bin/firecracker", "", 1),
        ("/usr/bin/qemu", "ok", 1),  # the jailer runs only a file named firecracker
        ("firecracker", "ok", 1),  # and only by its path
        ("/usr/bin/firecracker", "ok", -1),
    ],
)
def test_the_jailer_command_line_refuses_what_the_jailer_would(
    firecracker_path: str, vm_id: str, uid: int
) -> None:
    with pytest.raises(ValueError):
        jailer_argv("jailer", firecracker_path, vm_id=vm_id, uid=uid, gid=1)


# (e) An API socket that answers wrongly: the driver's error, bounded, never a hang.


async def serve_once(path: Path, answer: bytes, *, endless: bool = False) -> asyncio.Server:
    async def reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(answer)
            while endless:
                writer.write(b"x" * 65536)
                await writer.drain()
            await writer.drain()
            if not answer:
                await reader.read()  # silent until the client gives up
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    return await asyncio.start_unix_server(reply, path=str(path))


@pytest.mark.parametrize(
    ("answer", "endless", "error"),
    [
        (b"garbage\r\n\r\n", False, "status line that is not HTTP/1.x"),
        (b"\xff\xfe\r\n", False, "not ASCII"),
        (b"HTTP/1.1 200 \r\nContent-Length: 999999999\r\n\r\n", False, "a body of 999999999"),
        (b"HTTP/1.1 200 \r\nContent-Length: -1\r\n\r\n", False, "Content-Length"),
        (b"HTTP/1.1 200 \r\nTransfer-Encoding: chunked\r\n\r\n", False, "Transfer-Encoding"),
        (b"HTTP/1.1 200 \r\n" + b"X: y\r\n" * 100 + b"\r\n", False, "more than 64 header"),
        (b"HTTP/1.1 200 \r\nX: ", True, "longer than 8192"),
        (b"HTTP/1.1 200 \r\nContent-Length: 10\r\n\r\nabc", False, "socket failed"),
        (b"HTTP/1.1 200 \r\nContent-Length: 3\r\n\r\nabc", False, "not JSON"),
        # Nested past Python's recursion limit, within the body's bound.
        (b"HTTP/1.1 200 \r\nContent-Length: 60000\r\n\r\n" + b"[" * 60000, False, "not JSON"),
        (b"HTTP/1.1 200 \r\n\r\n", False, "without a Content-Length"),
        (b'HTTP/1.1 200 \r\nContent-Length: 9\r\n\r\n{"id": 1}', False, "not an instance"),
        (b"", False, "no answer within 0.5s"),
    ],
)
async def test_an_api_that_answers_wrongly_is_a_firecracker_error(
    tmp_path: Path, answer: bytes, endless: bool, error: str
) -> None:
    path = tmp_path / "api.sock"
    server = await serve_once(path, answer, endless=endless)
    try:
        started = time.monotonic()
        with pytest.raises(FirecrackerError, match=error) as caught:
            await FirecrackerApi(path, timeout_s=0.5).describe()
        assert not isinstance(caught.value, ApiError)
        assert time.monotonic() - started < 5
    finally:
        server.close()


async def test_an_api_fault_not_in_json_is_still_the_api_s_error(tmp_path: Path) -> None:
    path = tmp_path / "api.sock"
    server = await serve_once(path, b"HTTP/1.1 500 \r\nContent-Length: 5\r\n\r\nhello")
    try:
        error = await refusal(FirecrackerApi(path).start(), 500)
        assert error.fault_message == "hello"
    finally:
        server.close()


@pytest.mark.parametrize(
    ("answers", "error"),
    [
        ([b"OK 1073741824\nfirst bytes"], None),
        ([b"", b"", b"OK 7\n"], None),  # closed while nobody listens, then listened
        ([b"NO\n"], "answered b'NO\\\\n'"),
        ([b"OK " + b"1" * 40], "too long"),
    ],
)
async def test_the_vsock_handshake(tmp_path: Path, answers: list[bytes], error: str | None) -> None:
    path = tmp_path / "v.sock"
    asked: list[bytes] = []

    async def device(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        asked.append(await reader.readuntil(b"\n"))
        writer.write(answers[min(len(asked), len(answers)) - 1])
        await writer.drain()
        writer.close()

    server = await asyncio.start_unix_server(device, path=str(path))
    try:
        if error is None:
            channel = await connect_vsock(path, timeout_s=5)
            assert asked == [f"CONNECT {vsock_stdio.PORT}\n".encode()] * len(answers)
            if answers[-1].startswith(b"OK 1073741824"):
                loop = asyncio.get_running_loop()
                assert await loop.sock_recv(channel, 100) == b"first bytes"  # not eaten
            channel.close()
        else:
            with pytest.raises(FirecrackerError, match=error):
                await connect_vsock(path, timeout_s=5)
    finally:
        server.close()


# The guest's side of the channel: one connection, made the program's stdin and stdout.

SERVE = """
import socket, sys
from treadle.guest.vsock_stdio import serve
listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
listener.bind(sys.argv[1])
listener.listen(1)
sys.exit(serve(listener, sys.argv[2:]))
"""


def test_vsock_stdio_gives_its_one_connection_to_the_program_it_becomes(tmp_path: Path) -> None:
    path = tmp_path / "port.sock"
    process = subprocess.Popen(
        [sys.executable, "-c", SERVE, str(path), "sh", "-c", "echo $$; tr a-z A-Z"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while not path.exists():
            assert time.monotonic() < deadline
            time.sleep(0.02)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as channel:
            channel.settimeout(30)
            channel.connect(str(path))
            channel.sendall(b"hello\n")
            channel.shutdown(socket.SHUT_WR)
            answer = b""
            while data := channel.recv(4096):
                answer += data
        pid, upper = answer.decode().split()
        assert (int(pid), upper) == (process.pid, "HELLO")  # the same process, executed
        assert process.wait(30) == 0
    finally:
        process.kill()
        process.wait()


def test_vsock_stdio_without_a_port_and_a_program_says_how_to_use_it() -> None:
    assert vsock_stdio.main([]) == 2
    assert vsock_stdio.main(["52"]) == 2
    assert vsock_stdio.main(["port", "true"]) == 2


@pytest.mark.parametrize(
    ("method", "path"), [("GET", "/ HTTP/1.1\r\nX: y"), ("get", "/"), ("PUT", "x")]
)
async def test_a_request_line_cannot_be_injected(method: str, path: str) -> None:
    with pytest.raises(ValueError):
        await FirecrackerApi(Path("/nonexistent")).request(method, path)
