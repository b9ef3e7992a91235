"""Booting the guest with Firecracker, where the node has it (`docs/firecracker.md`).

Firecracker has no command line for a machine: it serves an HTTP API on a Unix socket
(`--api-sock`), and a guest is described there before it starts (machine config, boot
source, drives, vsock) and then started (`InstanceStart`); after that the same calls are
refused. This module speaks that API with a small HTTP/1.1 client of its own: a VMM runs
next to a tenant's guest, so everything it answers is read with bounded sizes and under a
timeout, and a reply that is not the API's ends in `FirecrackerError`, never a hang.

The guest agent's channel: Firecracker has no virtio-serial, so the guest agent listens on
a vsock port (`treadle.guest.vsock_stdio`, started by the image's /init when the kernel's
command line says `treadle.channel=vsock`), and the host reaches it through the vsock
device's Unix socket with Firecracker's handshake: `CONNECT <port>\\n`, answered
`OK <host port>\\n`, or closed while nobody listens yet, so the driver asks again until the
guest listens or the boot's time is up. What comes over the channel then is the same
protocol as every tier's, held to `treadle.protocol.guest` by whoever reads it.

The jailer (`jailer_argv`): Firecracker's own sandbox (chroot, cgroups, namespaces, its
ids), for nodes that run it as root; the driver itself starts `firecracker` directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from treadle.guest.vsock_stdio import PORT
from treadle.shuttle.microvm.image import CHANNEL_ARG, GuestImage

__all__ = [
    "GUEST_CID",
    "ApiError",
    "Drive",
    "FirecrackerApi",
    "FirecrackerError",
    "Vm",
    "boot",
    "connect_vsock",
    "jail_root",
    "jailer_argv",
]

# The guest's vsock address; the host is 2, and 3 is the first a guest may have.
GUEST_CID = 3
# What the guest is told: its console on the one serial port, the agent's channel, no
# reboot (a guest that ends ends Firecracker), no PCI or keyboard probing to wait for.
_CMDLINE = (
    "console=ttyS0 quiet panic=-1 reboot=k pci=off i8042.noaux i8042.nomux i8042.nopnp "
    "i8042.dumbkbd mitigations=off cryptomgr.notests nokaslr random.trust_cpu=on "
    f"{CHANNEL_ARG}"
)
# Bounds on what the VMM may send: the API's answers are a few hundred bytes.
_MAX_HEAD = 8 * 1024
_MAX_HEADERS = 64
_MAX_BODY = 64 * 1024
_MAX_HANDSHAKE = 32
_API_TIMEOUT_S = 10.0
_CONSOLE_KEEP = 16 * 1024
# The longest path a Unix socket can bind to (`sun_path`, less its NUL).
_MAX_SOCKET_PATH = 107
_ID = re.compile(r"[A-Za-z0-9-]{1,64}")


class FirecrackerError(OSError):
    """Firecracker, or what stands where it should, did not do what its API says."""


class ApiError(FirecrackerError):
    """The API refused a request: its status and its `fault_message`."""

    def __init__(self, method: str, path: str, status: int, fault_message: str) -> None:
        super().__init__(f"{method} {path}: {status}: {fault_message}")
        self.method = method
        self.path = path
        self.status = status
        self.fault_message = fault_message


@dataclass(frozen=True, slots=True)
class Drive:
    drive_id: str
    path: Path
    read_only: bool = True
    root: bool = False


class FirecrackerApi:
    """Firecracker's API on its socket at `path`; one connection per request, so that a
    connection the VMM left half-answered cannot confuse the next request."""

    def __init__(self, path: Path, timeout_s: float = _API_TIMEOUT_S) -> None:
        self.path = path
        self.timeout_s = timeout_s

    async def request(self, method: str, path: str, body: bytes | None = None) -> Any:
        """The decoded JSON an answer carries (None for 204); `ApiError` for a refusal,
        `FirecrackerError` for anything that is not an answer of the API's shape."""
        if not re.fullmatch(r"[A-Z]+", method) or not re.fullmatch(r"/[!-~]*", path):
            raise ValueError(f"not a request line's method and path: {method!r} {path!r}")
        head = [f"{method} {path} HTTP/1.1", "Host: localhost", "Accept: application/json"]
        if body is not None:
            head += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
        message = ("\r\n".join(head) + "\r\n\r\n").encode() + (body or b"")
        try:
            async with asyncio.timeout(self.timeout_s):
                status, content = await self._exchange(message)
        except TimeoutError:
            raise FirecrackerError(
                f"{method} {path}: no answer within {self.timeout_s:g}s"
            ) from None
        except FirecrackerError as e:
            raise FirecrackerError(f"{method} {path}: the answer had {e}") from None
        except (OSError, asyncio.IncompleteReadError) as e:
            raise FirecrackerError(f"{method} {path}: the API's socket failed: {e}") from e
        if 200 <= status < 300:
            if status == 204 or not content:
                return None
            try:
                return json.loads(content)
            except (ValueError, RecursionError):  # nested past Python's depth: not JSON here
                raise FirecrackerError(f"{method} {path}: {status} with a body not JSON") from None
        fault = _fault(content)
        raise ApiError(method, path, status, fault)

    async def _exchange(self, message: bytes) -> tuple[int, bytes]:
        reader, writer = await asyncio.open_unix_connection(str(self.path), limit=_MAX_HEAD)
        try:
            writer.write(message)
            await writer.drain()
            status = _status(await _line(reader))
            length: int | None = None
            for _ in range(_MAX_HEADERS + 1):
                line = await _line(reader)
                if not line:
                    break
                name, _, value = line.partition(":")
                name = name.strip().lower()
                if name == "content-length":
                    if not value.strip().isdigit():
                        raise FirecrackerError(f"a Content-Length of {value.strip()!r}")
                    length = int(value)
                elif name == "transfer-encoding":
                    raise FirecrackerError(
                        f"a Transfer-Encoding ({value.strip()}) the API never uses"
                    )
            else:
                raise FirecrackerError(f"more than {_MAX_HEADERS} header lines")
            if length is None:
                if status not in (204, 304) and not 100 <= status < 200:
                    raise FirecrackerError(f"a {status} answer without a Content-Length")
                return status, b""
            if length > _MAX_BODY:
                raise FirecrackerError(f"a body of {length} bytes (at most {_MAX_BODY} taken)")
            return status, await reader.readexactly(length)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _put(self, path: str, body: dict[str, Any], method: str = "PUT") -> None:
        await self.request(method, path, json.dumps(body).encode())

    async def describe(self) -> dict[str, Any]:
        """The instance: `state` is "Not started", "Running" or "Paused"."""
        info = await self.request("GET", "/")
        if not isinstance(info, dict) or not isinstance(info.get("state"), str):
            raise FirecrackerError(f"GET /: not an instance's description: {info!r:.200}")
        return info

    async def machine_config(self, vcpu_count: int, mem_size_mib: int) -> None:
        await self._put(
            "/machine-config",
            {"vcpu_count": vcpu_count, "mem_size_mib": mem_size_mib, "smt": False},
        )

    async def boot_source(self, kernel: Path, initrd: Path | None, boot_args: str) -> None:
        body: dict[str, Any] = {"kernel_image_path": str(kernel), "boot_args": boot_args}
        if initrd is not None:
            body["initrd_path"] = str(initrd)
        await self._put("/boot-source", body)

    async def drive(self, drive: Drive) -> None:
        body = {
            "drive_id": drive.drive_id,
            "path_on_host": str(drive.path),
            "is_root_device": drive.root,
            "is_read_only": drive.read_only,
        }
        await self._put(f"/drives/{drive.drive_id}", body)

    async def vsock(self, guest_cid: int, uds_path: Path) -> None:
        await self._put("/vsock", {"guest_cid": guest_cid, "uds_path": str(uds_path)})

    async def start(self) -> None:
        await self._put("/actions", {"action_type": "InstanceStart"})

    async def ctrl_alt_del(self) -> None:
        await self._put("/actions", {"action_type": "SendCtrlAltDel"})

    async def pause(self) -> None:
        await self._put("/vm", {"state": "Paused"}, "PATCH")

    async def resume(self) -> None:
        await self._put("/vm", {"state": "Resumed"}, "PATCH")


async def _line(reader: asyncio.StreamReader) -> str:
    try:
        line = await reader.readuntil(b"\n")
    except asyncio.LimitOverrunError:
        raise FirecrackerError(f"a header line longer than {_MAX_HEAD} bytes") from None
    try:
        return line.decode("ascii").rstrip("\r\n")
    except UnicodeDecodeError:
        raise FirecrackerError(f"a header line not ASCII: {line[:80]!r}") from None


def _status(line: str) -> int:
    # Firecracker's own status line has no reason phrase: "HTTP/1.1 204 ".
    parts = line.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not re.fullmatch(r"\d{3}", parts[1]):
        raise FirecrackerError(f"a status line that is not HTTP/1.x: {line[:80]!r}")
    return int(parts[1])


def _fault(content: bytes) -> str:
    try:
        body = json.loads(content)
    except (ValueError, RecursionError):
        body = None
    if isinstance(body, dict) and isinstance(body.get("fault_message"), str):
        return str(body["fault_message"])
    return content[:200].decode(errors="replace") or "(no fault_message)"


@dataclass
class Vm:
    """A running guest: Firecracker's process, its API, and the host end of the agent's
    channel."""

    process: asyncio.subprocess.Process
    channel: socket.socket
    workdir: Path
    api: FirecrackerApi
    console: bytearray = field(default_factory=bytearray)
    _reader: asyncio.Task[None] | None = None

    def kill(self) -> None:
        _kill(self.process)

    async def wait(self) -> int:
        code = await self.process.wait()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)
        return code

    async def close(self) -> None:
        """Kill the guest, wait for Firecracker, and remove its sockets and directory."""
        self.kill()
        await self.wait()
        self.channel.close()
        shutil.rmtree(self.workdir, ignore_errors=True)


def _kill(process: asyncio.subprocess.Process) -> None:
    # Its process group (its own session): whatever the VMM started dies with it.
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)


async def boot(
    image: GuestImage,
    workdir: Path,
    *,
    memory_mib: int = 256,
    cpus: int = 1,
    timeout_s: float = 60.0,
    firecracker: str | None = None,
    drives: Sequence[Drive] = (),
    kernel_args: str = "",
    vm_id: str = "treadle",
) -> Vm:
    """Start a guest in `workdir` (made here, removed by `Vm.close` or by a failed boot):
    Firecracker, its configuration through the API, `InstanceStart`, then the agent's
    channel over vsock, asked for until the guest listens. `ApiError` where the API refuses
    a step, `FirecrackerError` for the rest (the console's last words in its message)."""
    program = firecracker or shutil.which("firecracker")
    if program is None:
        raise FirecrackerError("firecracker is not installed (docs/firecracker.md says how)")
    if not _ID.fullmatch(vm_id):
        raise ValueError(f"not a Firecracker instance id: {vm_id!r}")
    api_path, vsock_path = workdir / "api.sock", workdir / "vsock.sock"
    if len(os.fsencode(vsock_path)) > _MAX_SOCKET_PATH:
        raise FirecrackerError(f"{workdir} is too long a path for Firecracker's sockets")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    os.mkdir(workdir, 0o700)
    try:
        process = await asyncio.create_subprocess_exec(
            program,
            "--api-sock",
            str(api_path),
            "--id",
            vm_id,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    except OSError:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    console = bytearray()
    reader = asyncio.create_task(_keep_console(process, console))
    exited = asyncio.ensure_future(process.wait())
    api = FirecrackerApi(api_path)
    try:
        await _wait_for_api(api_path, exited, deadline)
        await api.machine_config(cpus, memory_mib)
        await api.boot_source(image.kernel, image.initrd, f"{_CMDLINE} {kernel_args}".strip())
        for drive in drives:
            await api.drive(drive)
        await api.vsock(GUEST_CID, vsock_path)
        await api.start()
        channel = await connect_vsock(
            vsock_path, PORT, timeout_s=deadline - loop.time(), exited=exited
        )
    except BaseException as e:
        _kill(process)
        await process.wait()
        await asyncio.gather(reader, return_exceptions=True)
        shutil.rmtree(workdir, ignore_errors=True)
        if isinstance(e, FirecrackerError) and not isinstance(e, ApiError):
            seen = bytes(console[-2000:]).decode(errors="replace").strip()
            raise FirecrackerError(f"{e}; the console said: {seen or 'nothing'}") from e
        raise
    finally:
        exited.cancel()
    vm = Vm(process, channel, workdir, api, console)
    vm._reader = reader
    return vm


async def _wait_for_api(path: Path, exited: asyncio.Future[int], deadline: float) -> None:
    """Until the API answers on its socket, which Firecracker makes as it starts; a socket
    that accepts and then answers wrongly is not waited on."""
    loop = asyncio.get_running_loop()
    while True:
        if exited.done():
            raise FirecrackerError(
                f"firecracker exited ({exited.result()}) before its API answered"
            )
        left = deadline - loop.time()
        if left <= 0:
            raise FirecrackerError(f"firecracker's API did not answer at {path} in time")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        probe.setblocking(False)
        try:
            await asyncio.wait_for(loop.sock_connect(probe, str(path)), left)
        except (FileNotFoundError, ConnectionError):
            await asyncio.sleep(0.02)
            continue
        except TimeoutError:
            continue
        finally:
            probe.close()
        info = await FirecrackerApi(path, min(left, _API_TIMEOUT_S)).describe()
        if info["state"] != "Not started":
            raise FirecrackerError(f"a VMM whose instance is already {info['state']}")
        return


class _NobodyListens(Exception):
    pass


async def connect_vsock(
    path: Path,
    port: int = PORT,
    *,
    timeout_s: float = 10.0,
    exited: asyncio.Future[int] | None = None,
) -> socket.socket:
    """The channel to guest port `port`, through the vsock device's Unix socket at `path`:
    asked for until the guest listens, `timeout_s` passes or `exited` (the VMM's end) is
    done."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    delay = 0.02
    while True:
        if exited is not None and exited.done():
            raise FirecrackerError(
                f"firecracker exited ({exited.result()}) before the guest listened on "
                f"vsock port {port}"
            )
        left = deadline - loop.time()
        if left <= 0:
            raise FirecrackerError(f"the guest did not listen on vsock port {port} in time")
        try:
            return await asyncio.wait_for(_handshake(path, port), min(left, 5.0))
        except (_NobodyListens, ConnectionError, FileNotFoundError, TimeoutError):
            await asyncio.sleep(min(delay, max(0.0, deadline - loop.time())))
            delay = min(delay * 2, 0.25)


async def _handshake(path: Path, port: int) -> socket.socket:
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, str(path))
        await loop.sock_sendall(sock, f"CONNECT {port}\n".encode())
        # A byte at a time: what the guest sends right after the answer is the agent's.
        answer = b""
        while not answer.endswith(b"\n"):
            if len(answer) >= _MAX_HANDSHAKE:
                raise FirecrackerError(f"the vsock handshake's answer is too long: {answer!r}")
            byte = await loop.sock_recv(sock, 1)
            if not byte:
                raise _NobodyListens
            answer += byte
        if not re.fullmatch(rb"OK \d{1,10}\n", answer):
            raise FirecrackerError(f"the vsock handshake was answered {answer!r}")
    except BaseException:
        sock.close()
        raise
    return sock


async def _keep_console(process: asyncio.subprocess.Process, kept: bytearray) -> None:
    """What the guest's console and Firecracker say, the last 16 KiB of it."""
    assert process.stdout is not None
    while data := await process.stdout.read(65536):
        kept += data
        if len(kept) > _CONSOLE_KEEP:
            del kept[: len(kept) - _CONSOLE_KEEP]


def jail_root(chroot_base: Path, firecracker: str, vm_id: str) -> Path:
    """Where the jailer builds the guest's chroot; the kernel, initrd and drives must be
    linked in there, and the API's paths are then relative to it."""
    return chroot_base / Path(firecracker).name / vm_id / "root"


def jailer_argv(
    jailer: str,
    firecracker: str,
    *,
    vm_id: str,
    uid: int,
    gid: int,
    chroot_base: Path = Path("/srv/jailer"),
    memory_limit_bytes: int | None = None,
    cgroup_version: int = 2,
    netns: Path | None = None,
    new_pid_ns: bool = True,
    api_sock: str = "/run/firecracker.socket",
) -> list[str]:
    """The jailer's command line for one guest (`docs/jailer.md` in Firecracker): it runs
    as root, makes the chroot (`jail_root`), the cgroup (memory limited to
    `memory_limit_bytes`: the guest's memory and the VMM's own), joins `netns`, drops to
    `uid`:`gid` and execs `firecracker`, which makes its API socket at `api_sock` inside
    the chroot. The jailer passes `--id` on itself."""
    if not _ID.fullmatch(vm_id):
        raise ValueError(f"not a jailer id (letters, digits, '-', at most 64): {vm_id!r}")
    if not os.path.isabs(firecracker) or "firecracker" not in Path(firecracker).name:
        raise ValueError(f"the jailer runs only a file named firecracker, by path: {firecracker}")
    if uid < 0 or gid < 0:
        raise ValueError("uid and gid must be ids")
    if cgroup_version not in (1, 2):
        raise ValueError(f"no cgroup version {cgroup_version}")
    argv = [
        jailer,
        "--id",
        vm_id,
        "--exec-file",
        firecracker,
        "--uid",
        str(uid),
        "--gid",
        str(gid),
        "--chroot-base-dir",
        str(chroot_base),
        "--cgroup-version",
        str(cgroup_version),
    ]
    if memory_limit_bytes is not None:
        limit = "memory.max" if cgroup_version == 2 else "memory.limit_in_bytes"
        argv += ["--cgroup", f"{limit}={memory_limit_bytes}"]
    if netns is not None:
        argv += ["--netns", str(netns)]
    if new_pid_ns:
        argv.append("--new-pid-ns")
    return [*argv, "--", "--api-sock", api_sock]
