"""A stand-in for the `firecracker` binary, for hosts where Firecracker cannot run (it is in
no package registry these tests may use, and it needs KVM, which this host's nested KVM
does not give). It exists so that the Firecracker driver is tested against something that
holds it to Firecracker's published API, not against its own idea of it.

What is faithful, taken from Firecracker's API spec (`src/firecracker/swagger/firecracker.yaml`)
and its source (`api_server/parsed_request.rs`, `vmm/src/rpc_interface.rs`):
- the command line's subset the driver and the jailer use (`--api-sock`, `--id`, the jailer's
  `--start-time-*`), and an API socket that must not exist yet;
- HTTP/1.1 on that socket, keep-alive, answers shaped as Firecracker's (`HTTP/1.1 204 `, no
  reason phrase; errors `{"fault_message": ...}`), 400 for every refusal, bodies of at most
  51200 bytes (Firecracker's default `--http-api-max-payload-size`);
- the routes and their order: an unknown route is `Invalid request method and/or path`, a
  PUT or PATCH without a body is refused, a GET with one is refused;
- the bodies as serde reads them, `deny_unknown_fields`: an unknown field, a missing one, a
  wrong type or an unknown enum variant is refused (serde's wording, without its positions);
- the phase rules: machine config, boot source, drives, vsock and `InstanceStart` only
  before the start (after it: "The requested operation is not supported after starting the
  microVM."), `PATCH /vm` and `SendCtrlAltDel` only after (before it: "... before starting
  the microVM."), `InstanceStart` without a boot source refused; the values' checks
  (vCPUs 1-32, SMT's even count, memory, files that must open, one root drive, the drive's
  id in the path and the body);
- the vsock device's host side: its socket bound when `PUT /vsock` is answered, and the
  hybrid handshake on it: `CONNECT <port>\\n` answered `OK <host port>\\n` (host ports from
  2^30 up) and then the bytes both ways, or the connection closed while nobody listens on
  that guest port;
- the process exits when its guest ends, with its VMM's status.

What is not: the VMM is QEMU (`-M microvm`, software emulation), started on `InstanceStart`
with the configured kernel, initrd, memory, vCPUs and drives (virtio-blk). There is no vsock
inside: the guest gets a virtio-serial port named `treadle.agent` (the QEMU tier's channel),
and the guest port `treadle.guest.vsock_stdio.PORT` is mapped onto it: it "listens" once the
guest has written its first bytes on the port, accepts one connection (as the guest's
`vsock_stdio` does) and closing that connection closes the port. So `treadle.channel=vsock`
is dropped from the kernel's command line, and what software emulation needs is added to it.
Pause and resume are QEMU's `stop` and `cont`; `SendCtrlAltDel` is sent as QEMU's key chord
(QMP `send-key`), and only its phase rule is checked. Routes the driver does not use (balloon,
logger, metrics, MMDS, network, snapshots and the rest) answer 400, saying that the
stand-in does not model them. Fault messages follow Firecracker's where its source gives
them, and are the stand-in's own where they come from Firecracker's HTTP library or would
need the VMM's internals (a malformed request line, a drive's backing file, the vsock
backend's errors).

    python firecracker_standin.py --api-sock PATH [--id ID] [--qemu QEMU]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from treadle.guest.vsock_stdio import PORT as AGENT_PORT
from treadle.shuttle.microvm import qemu
from treadle.shuttle.microvm.image import PORT_NAME

__all__ = ["POST_BOOT", "PRE_BOOT", "VERSION", "install", "main"]

VERSION = "0.0.0-standin"
MAX_PAYLOAD = 51200
POST_BOOT = "The requested operation is not supported after starting the microVM."
PRE_BOOT = "The requested operation is not supported before starting the microVM."
# Firecracker's command line for a guest that PUT no boot_args.
DEFAULT_CMDLINE = (
    "reboot=k panic=1 pci=off nomodule 8250.nr_uarts=0 i8042.noaux i8042.nomux i8042.nopnp "
    "i8042.dumbkbd"
)
_GUEST_PENDING_MAX = 1 << 20
_FIRST_HOST_PORT = 1 << 30
_ID = re.compile(r"[A-Za-z0-9-]{1,64}")
_NOT_MODELED = {
    "GET": {"balloon", "mmds", "hotplug"},
    "PUT": {
        "balloon",
        "cpu-config",
        "entropy",
        "hotplug",
        "logger",
        "metrics",
        "mmds",
        "network-interfaces",
        "pmem",
        "serial",
        "snapshot",
    },
    "PATCH": {
        "balloon",
        "drives",
        "hotplug",
        "machine-config",
        "mmds",
        "network-interfaces",
        "pmem",
    },
}

# The bodies, as Firecracker's serde structs read them: field -> (type, required). A type
# ending in "?" is an `Option` (null allowed); a tuple is an enum's variants.
Schema = dict[str, tuple[Any, bool]]
MACHINE_CONFIG: Schema = {
    "vcpu_count": ("u8", True),
    "mem_size_mib": ("usize", True),
    "smt": ("bool", False),
    "cpu_template": (("C3", "T2", "T2S", "T2CL", "T2A", "V1N1", "None"), False),
    "track_dirty_pages": ("bool", False),
    "huge_pages": (("None", "Transparent", "2M"), False),
}
BOOT_SOURCE: Schema = {
    "kernel_image_path": ("str", True),
    "initrd_path": ("str?", False),
    "boot_args": ("str?", False),
}
DRIVE: Schema = {
    "drive_id": ("str", True),
    "partuuid": ("str?", False),
    "is_root_device": ("bool", True),
    "cache_type": (("Unsafe", "Writeback"), False),
    "is_read_only": ("bool?", False),
    "path_on_host": ("str?", False),
    "rate_limiter": ("map?", False),
    "io_engine": (("Sync", "Async"), False),
    "socket": ("str?", False),
}
VSOCK: Schema = {"vsock_id": ("str?", False), "guest_cid": ("u32", True), "uds_path": ("str", True)}
ACTION: Schema = {"action_type": (("FlushMetrics", "InstanceStart", "SendCtrlAltDel"), True)}
VM_STATE: Schema = {"state": (("Paused", "Resumed"), True)}
_PLAIN = {"str": (str, "a string"), "bool": (bool, "a boolean"), "map": (dict, "a map")}
_BOUNDS = {"u8": 0xFF, "u32": 0xFFFF_FFFF, "usize": 0xFFFF_FFFF_FFFF_FFFF}


class Refused(Exception):
    """A 400 and its fault message."""


def _unexpected(value: Any) -> str:
    """serde's name for what it found."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean `{str(value).lower()}`"
    if isinstance(value, int):
        return f"integer `{value}`"
    if isinstance(value, float):
        return f"floating point `{value}`"
    if isinstance(value, str):
        return f"string {json.dumps(value)}"
    return "sequence" if isinstance(value, list) else "map"


def _one_of(names: tuple[str, ...] | list[str]) -> str:
    quoted = [f"`{name}`" for name in names]
    if len(quoted) == 1:
        return f"expected {quoted[0]}"
    if len(quoted) == 2:
        return f"expected {quoted[0]} or {quoted[1]}"
    return f"expected one of {', '.join(quoted)}"


def _check(value: Any, kind: Any) -> str | None:
    if isinstance(kind, tuple):
        if not isinstance(value, str):
            return f"invalid type: {_unexpected(value)}, expected variant identifier"
        return None if value in kind else f"unknown variant `{value}`, {_one_of(kind)}"
    if kind.endswith("?"):
        if value is None:
            return None
        kind = kind[:-1]
    if kind in _PLAIN:
        cls, name = _PLAIN[kind]
        if isinstance(value, cls):
            return None
        return f"invalid type: {_unexpected(value)}, expected {name}"
    if not isinstance(value, int) or isinstance(value, bool):
        return f"invalid type: {_unexpected(value)}, expected {kind}"
    if not 0 <= value <= _BOUNDS[kind]:
        return f"invalid value: integer `{value}`, expected {kind}"
    return None


def decode(body: bytes, schema: Schema) -> dict[str, Any]:
    """The body as serde reads it into a struct with `deny_unknown_fields`."""

    def refuse(why: str) -> Refused:
        return Refused(f"An error occurred when deserializing the json body of a request: {why}.")

    try:
        value = json.loads(body)
    except ValueError as e:
        why = "expected value" if getattr(e, "msg", "") == "Expecting value" else str(e)
        raise refuse(why) from None
    if not isinstance(value, dict):
        raise refuse(f"invalid type: {_unexpected(value)}, expected a struct")
    for name, item in value.items():
        if name not in schema:
            raise refuse(f"unknown field `{name}`, {_one_of(list(schema))}")
        problem = _check(item, schema[name][0])
        if problem:
            raise refuse(problem)
    for name, (_, required) in schema.items():
        if required and name not in value:
            raise refuse(f"missing field `{name}`")
    return value


def _os_error(e: OSError) -> str:
    """An `io::Error` as Rust displays it."""
    return f"{os.strerror(e.errno or 0)} (os error {e.errno})"


def _try_open(path: str, *, writable: bool = False) -> None:
    os.close(os.open(path, os.O_RDWR if writable else os.O_RDONLY))


def _bind(path: str) -> socket.socket:
    """A listening socket at `path`, which must not exist (as Firecracker's bind)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(path)
        sock.listen(16)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


class StandIn:
    def __init__(self, api_sock: Path, instance_id: str, qemu: str | None) -> None:
        self.api_sock = api_sock
        self.id = instance_id
        self.qemu = qemu or shutil.which("qemu-system-x86_64")
        self.machine: dict[str, Any] = {
            "vcpu_count": 1,
            "mem_size_mib": 128,
            "smt": False,
            "track_dirty_pages": False,
            "huge_pages": "None",
        }
        self.boot_source: dict[str, Any] | None = None
        self.drives: dict[str, dict[str, Any]] = {}
        self.vsock: dict[str, Any] | None = None
        self.vsock_server: asyncio.Server | None = None
        self.state = "Not started"
        self.started = asyncio.Event()
        self.vmm: asyncio.subprocess.Process | None = None
        self.private: Path | None = None
        self.done: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        # The guest port's side of the vsock mapping.
        self.guest: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self.listening = asyncio.Event()
        self.accepted = False
        self.pending = bytearray()
        self.host: asyncio.StreamWriter | None = None
        self.bridged = asyncio.Event()
        self.next_port = _FIRST_HOST_PORT
        self.qmp: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self.tasks: set[asyncio.Task[Any]] = set()

    # The API's HTTP.

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    request = await self._read_request(reader)
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                except Refused as e:
                    writer.write(_response(400, {"fault_message": str(e)}))
                    await writer.drain()
                    return
                if request is None:
                    return
                method, path, body = request
                try:
                    status, payload = await self.handle(method, path, body)
                except Refused as e:
                    status, payload = 400, {"fault_message": str(e)}
                writer.write(_response(status, payload))
                await writer.drain()
        except (ConnectionError, asyncio.LimitOverrunError, ValueError):
            pass
        finally:
            writer.close()

    async def _read_request(
        self, reader: asyncio.StreamReader
    ) -> tuple[str, str, bytes | None] | None:
        line = await reader.readline()
        if not line:
            return None
        parts = line.decode("latin-1").rstrip("\r\n").split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            raise Refused("Invalid HTTP request line.")
        method, uri = parts[0], parts[1]
        if method not in ("GET", "PUT", "PATCH"):
            raise Refused("Unsupported HTTP method.")
        length = 0
        for _ in range(64):
            header = (await reader.readline()).decode("latin-1").rstrip("\r\n")
            if not header:
                break
            name, _, value = header.partition(":")
            if name.strip().lower() == "content-length":
                if not value.strip().isdigit():
                    raise Refused("Invalid value for Content-Length.")
                length = int(value)
        else:
            raise Refused("Too many headers.")
        if length > MAX_PAYLOAD:
            raise Refused(
                f"Request payload with size {length} is larger than the limit of "
                f"{MAX_PAYLOAD} allowed by server."
            )
        body = await reader.readexactly(length) if length else None
        path = re.sub(r"^https?://[^/]*", "", uri).split("?", 1)[0]
        return method, path, body

    async def handle(self, method: str, path: str, body: bytes | None) -> tuple[int, Any]:
        """Firecracker's routes, matched in the order `parsed_request.rs` matches them."""
        tokens = path.lstrip("/").split("/")
        if len(tokens) > 1 and tokens[-1] == "":
            tokens.pop()
        first, second = tokens[0], (tokens[1] if len(tokens) > 1 else None)
        if method == "GET":
            if body is not None:
                raise Refused("GET request cannot have a body.")
            if first == "":
                return 200, self.info()
            if first == "version":
                return 200, {"firecracker_version": VERSION}
            if first == "machine-config":
                return 200, self.machine
            if first == "vm" and second == "config":
                return 200, self.full_config()
        elif body is None and method in ("PUT", "PATCH"):
            raise Refused(f"Empty {method} request.")
        elif method == "PUT" and body is not None:
            handler = {
                "actions": self.put_action,
                "boot-source": self.put_boot_source,
                "machine-config": self.put_machine_config,
                "vsock": self.put_vsock,
            }.get(first)
            if handler is not None:
                return await handler(body)
            if first == "drives":
                return await self.put_drive(body, second)
        elif method == "PATCH" and body is not None and first == "vm":
            return await self.patch_vm(body)
        if first in _NOT_MODELED.get(method, ()):
            raise Refused(f"The stand-in does not model {method} /{first}.")
        raise Refused(f"Invalid request method and/or path: {method} {first}.")

    def info(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "state": self.state,
            "vmm_version": VERSION,
            "app_name": "Firecracker",
        }

    def full_config(self) -> dict[str, Any]:
        return {
            "boot-source": self.boot_source,
            "drives": list(self.drives.values()),
            "machine-config": self.machine,
            "vsock": self.vsock,
        }

    # The handlers: the body first (as the API server parses it), then the phase (as the
    # VMM's pre-boot or runtime controller takes it), then the values.

    async def put_machine_config(self, body: bytes) -> tuple[int, Any]:
        config = decode(body, MACHINE_CONFIG)
        self._before_start()
        vcpus, memory = config["vcpu_count"], config["mem_size_mib"]
        smt, pages = config.get("smt", False), config.get("huge_pages", "None")
        if not 1 <= vcpus <= 32 or (smt and vcpus > 1 and vcpus % 2):
            raise Refused(
                "Machine config error: The number of vCPUs must be greater than 0, less than 32 "
                "and must be 1 or an even number if SMT is enabled."
            )
        if memory == 0 or (pages == "2M" and memory % 2):
            raise Refused(
                "Machine config error: The memory size (MiB) is either 0, or not a multiple of "
                "the configured page size."
            )
        self.machine = {
            "vcpu_count": vcpus,
            "mem_size_mib": memory,
            "smt": smt,
            "track_dirty_pages": config.get("track_dirty_pages", False),
            "huge_pages": pages,
        }
        return 204, None

    async def put_boot_source(self, body: bytes) -> tuple[int, Any]:
        config = decode(body, BOOT_SOURCE)
        self._before_start()
        try:
            _try_open(config["kernel_image_path"])
        except OSError as e:
            raise Refused(
                f"Boot source error: The kernel file cannot be opened: {_os_error(e)}"
            ) from None
        if config.get("initrd_path") is not None:
            try:
                _try_open(config["initrd_path"])
            except OSError as e:
                raise Refused(
                    "Boot source error: The initrd file cannot be opened due to invalid path or "
                    f"invalid permissions. {_os_error(e)}"
                ) from None
        self.boot_source = config
        return 204, None

    async def put_drive(self, body: bytes, drive_id: str | None) -> tuple[int, Any]:
        if not drive_id:
            raise Refused("The ID cannot be empty.")
        if not all(c == "_" or c.isalnum() for c in drive_id):
            raise Refused(
                "API Resource IDs can only contain alphanumeric characters and underscores."
            )
        config = decode(body, DRIVE)
        if config["drive_id"] != drive_id:
            raise Refused("The id from the path does not match the id from the body!")
        self._before_start()
        if config["is_root_device"] and any(
            d["is_root_device"] for i, d in self.drives.items() if i != drive_id
        ):
            raise Refused("Drive config error: A root block device already exists!")
        if config.get("socket") is not None:
            raise Refused("The stand-in does not model vhost-user drives.")
        path = config.get("path_on_host")
        if path is None:
            raise Refused("Drive config error: a virtio block device needs path_on_host.")
        try:
            _try_open(path, writable=not config.get("is_read_only"))
        except OSError as e:
            raise Refused(
                f"Drive config error: Unable to create the virtio block device: {_os_error(e)}"
            ) from None
        self.drives[drive_id] = config
        return 204, None

    async def put_vsock(self, body: bytes) -> tuple[int, Any]:
        config = decode(body, VSOCK)
        self._before_start()
        if config["guest_cid"] < 3:
            raise Refused(
                f"Vsock config error: the guest CID must be at least 3, not {config['guest_cid']}."
            )
        if self.vsock_server is not None and self.vsock is not None:
            self.vsock_server.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.vsock["uds_path"])
            self.vsock_server, self.vsock = None, None
        try:
            sock = _bind(config["uds_path"])
        except OSError as e:
            raise Refused(
                f"Vsock config error: Cannot create backend for vsock device: {_os_error(e)}"
            ) from None
        self.vsock_server = await asyncio.start_unix_server(self.vsock_client, sock=sock, limit=64)
        self.vsock = config
        return 204, None

    async def put_action(self, body: bytes) -> tuple[int, Any]:
        action = decode(body, ACTION)["action_type"]
        if action == "InstanceStart":
            self._before_start()
            if self.boot_source is None:
                raise Refused(
                    "Start microvm error: Cannot start microvm without kernel configuration."
                )
            try:
                await self.start()
            except OSError as e:
                raise Refused(f"Start microvm error: {e}") from None
            return 204, None
        self._after_start()
        if action == "SendCtrlAltDel":
            await self.monitor(
                "send-key",
                {"keys": [{"type": "qcode", "data": k} for k in ("ctrl", "alt", "delete")]},
            )
        return 204, None

    async def patch_vm(self, body: bytes) -> tuple[int, Any]:
        state = decode(body, VM_STATE)["state"]
        self._after_start()
        await self.monitor("stop" if state == "Paused" else "cont")
        self.state = "Paused" if state == "Paused" else "Running"
        return 204, None

    def _before_start(self) -> None:
        if self.state != "Not started":
            raise Refused(POST_BOOT)

    def _after_start(self) -> None:
        if self.state == "Not started":
            raise Refused(PRE_BOOT)

    # The VMM: QEMU.

    def cmdline(self) -> str:
        assert self.boot_source is not None
        args = self.boot_source.get("boot_args")
        words = (args if args is not None else DEFAULT_CMDLINE).split()
        words = [w for w in words if not w.startswith("treadle.channel=")]
        root = [d for d in self.drives.values() if d["is_root_device"]]
        if root:
            words += ["root=/dev/vda", "ro" if root[0].get("is_read_only") else "rw"]
        # What the guest needs under QEMU's software emulation (the TSC's rate, where known:
        # calibrating it can hang).
        khz = qemu.tsc_khz()
        words += ["no_timer_check", *([f"tsc_early_khz={khz}"] if khz else [])]
        return " ".join(words)

    async def start(self) -> None:
        assert self.boot_source is not None
        if self.qemu is None:
            raise OSError("the stand-in's VMM, qemu-system-x86_64, is not installed")
        loop = asyncio.get_running_loop()
        self.private = Path(tempfile.mkdtemp(prefix=".standin-", dir=self.api_sock.parent))
        qmp = self.private / "qmp.sock"
        argv = [
            self.qemu,
            "-accel",
            "tcg,tb-size=64",
            "-cpu",
            "max",
            "-m",
            str(self.machine["mem_size_mib"]),
            "-smp",
            str(self.machine["vcpu_count"]),
            "-M",
            "microvm,x-option-roms=off,isa-serial=on,acpi=on",
            "-nodefaults",
            "-no-user-config",
            "-nographic",
            "-no-reboot",
            "-kernel",
            self.boot_source["kernel_image_path"],
            "-append",
            self.cmdline(),
            "-serial",
            "stdio",
            "-qmp",
            f"unix:{qmp},server=on,wait=off",
        ]
        if self.boot_source.get("initrd_path") is not None:
            argv += ["-initrd", self.boot_source["initrd_path"]]
        # The root drive first: Firecracker makes it the guest's /dev/vda.
        ordered = sorted(self.drives.values(), key=lambda d: not d["is_root_device"])
        for n, drive in enumerate(ordered):
            path = drive["path_on_host"].replace(",", ",,")
            readonly = ",readonly=on" if drive.get("is_read_only") else ""
            argv += [
                "-drive",
                f"id=drive{n},file={path},format=raw,if=none{readonly}",
                "-device",
                f"virtio-blk-device,drive=drive{n}",
            ]
        listener = None
        if self.vsock is not None:
            agent = self.private / "agent.sock"
            listener = _bind(str(agent))
            argv += [
                "-chardev",
                f"socket,id=agent,path={agent}",
                "-device",
                "virtio-serial-device",
                "-device",
                f"virtserialport,chardev=agent,name={PORT_NAME}",
            ]
        try:
            self.vmm = await asyncio.create_subprocess_exec(
                *argv, stdin=subprocess.DEVNULL, stdout=None, stderr=None
            )
            if listener is not None:
                accept = asyncio.ensure_future(loop.sock_accept(listener))
                exited = asyncio.ensure_future(self.vmm.wait())
                await asyncio.wait({accept, exited}, timeout=30, return_when="FIRST_COMPLETED")
                exited.cancel()
                if not accept.done():
                    accept.cancel()
                    raise OSError("QEMU did not connect the guest's port")
                self.guest = await asyncio.open_unix_connection(sock=accept.result()[0])
                self._spawn(self.from_guest())
        except (OSError, TimeoutError) as e:
            if self.vmm is not None and self.vmm.returncode is None:
                self.vmm.kill()
            raise OSError(f"QEMU did not start: {e}") from None
        finally:
            if listener is not None:
                listener.close()
        self.state = "Running"
        self.started.set()
        self._spawn(self.watch())

    async def watch(self) -> None:
        assert self.vmm is not None
        code = await self.vmm.wait()
        if not self.done.done():
            self.done.set_result(code)

    async def monitor(self, command: str, arguments: dict[str, Any] | None = None) -> None:
        """One QMP command, on a connection made the first time one is needed."""
        assert self.private is not None
        if self.qmp is None:
            self.qmp = await asyncio.open_unix_connection(str(self.private / "qmp.sock"))
            await self.qmp[0].readline()
            await self._qmp({"execute": "qmp_capabilities"})
        message: dict[str, Any] = {"execute": command}
        if arguments:
            message["arguments"] = arguments
        await self._qmp(message)

    async def _qmp(self, message: dict[str, Any]) -> None:
        assert self.qmp is not None
        reader, writer = self.qmp
        writer.write(json.dumps(message).encode() + b"\n")
        await writer.drain()
        while True:
            answer = json.loads(await asyncio.wait_for(reader.readline(), 10))
            if "error" in answer:
                raise Refused(f"Internal VMM error: {answer['error'].get('desc', answer)}")
            if "return" in answer:
                return

    # The vsock device: its Unix socket, mapped onto the guest's virtio-serial port.

    async def from_guest(self) -> None:
        assert self.guest is not None
        reader = self.guest[0]
        while data := await reader.read(65536):
            self.listening.set()
            if self.host is None:
                if self.accepted:
                    continue  # its one connection has ended: nobody reads the guest
                self.pending += data
                if len(self.pending) >= _GUEST_PENDING_MAX:
                    await self.bridged.wait()
                continue
            self.host.write(data)
            with contextlib.suppress(ConnectionError):
                await self.host.drain()
        if self.host is not None:
            self.host.close()

    async def vsock_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            # Connections made before the start wait, as in the socket's backlog.
            await self.started.wait()
            line = await asyncio.wait_for(reader.readuntil(b"\n"), 5)
            asked = re.fullmatch(rb"CONNECT (\d{1,10})\n", line)
            if (
                asked is None
                or int(asked[1]) != AGENT_PORT
                or self.accepted
                or not self.listening.is_set()
                or self.guest is None
            ):
                return  # nobody listens there: Firecracker closes the connection
            self.accepted = True
            writer.write(f"OK {self.next_port}\n".encode() + bytes(self.pending))
            self.next_port += 1
            self.pending.clear()
            self.host = writer
            self.bridged.set()
            guest = self.guest[1]
            while data := await reader.read(65536):
                guest.write(data)
                await guest.drain()
            # The host's end closed: so does the guest's, as a vsock connection's would.
            self.host = None
            guest.close()
        except (
            ConnectionError,
            TimeoutError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
        ):
            pass
        finally:
            writer.close()

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.ensure_future(coroutine)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def run(self) -> int:
        try:
            sock = _bind(str(self.api_sock))
        except OSError as e:
            print(
                f"Failed to open the API socket at: {self.api_sock}. Check that it is not "
                f"already used. ({_os_error(e)})",
                file=sys.stderr,
            )
            return 1
        server = await asyncio.start_unix_server(self.serve, sock=sock, limit=8192)
        loop = asyncio.get_running_loop()

        def stop() -> None:
            if not self.done.done():
                self.done.set_result(0)

        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop)
        try:
            return await self.done
        finally:
            server.close()
            if self.vsock_server is not None:
                self.vsock_server.close()
            if self.vmm is not None and self.vmm.returncode is None:
                self.vmm.kill()
                await self.vmm.wait()
            if self.private is not None:
                shutil.rmtree(self.private, ignore_errors=True)


def _response(status: int, payload: Any) -> bytes:
    head = f"HTTP/1.1 {status} \r\nServer: Firecracker API\r\nConnection: keep-alive\r\n"
    if status == 204:
        return (head + "\r\n").encode()
    body = json.dumps(payload).encode()
    head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    return head.encode() + body


def install(directory: Path) -> Path:
    """A `firecracker` in `directory` that runs this stand-in with this Python."""
    path = directory / "firecracker"
    path.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} {shlex.quote(__file__)} "$@"\n')
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="firecracker",
        description="A stand-in for Firecracker's API, booting guests with QEMU (tests only).",
        allow_abbrev=False,
    )
    parser.add_argument("--api-sock", type=Path, default=Path("/run/firecracker.socket"))
    parser.add_argument("--id", default="anonymous-instance")
    for ignored in ("--start-time-us", "--start-time-cpu-us", "--parent-cpu-time-us"):
        parser.add_argument(ignored, help=argparse.SUPPRESS)
    parser.add_argument("--qemu", help="(the stand-in's own) the QEMU that runs guests")
    args = parser.parse_args(argv)
    if not _ID.fullmatch(args.id):
        print(f"Invalid instance ID: {args.id}", file=sys.stderr)
        return 1

    async def run() -> int:
        return await StandIn(args.api_sock, args.id, args.qemu).run()

    return asyncio.run(run())


if __name__ == "__main__":
    sys.exit(main())
