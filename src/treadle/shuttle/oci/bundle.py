"""OCI runtime bundles for one attempt (DESIGN §4, tiers `oci` and `gvisor`).

`build_config` is a pure function from what an attempt asks for to an OCI runtime-spec
`config.json`; `prepare_bundle` writes it into a fresh bundle directory. The sandbox it
describes:

- the image (or host) rootfs mounted read-only as `/`, shared by every execution;
- the attempt's work directory mounted read-write at `/work` (cwd and HOME; it holds the
  args file), a private size-limited tmpfs at `/tmp`;
- new pid, ipc, uts, mount and network namespaces (the network one holds only a loopback
  device that nothing else shares: no network), a user namespace when the host allows it;
- an unprivileged uid/gid, no capabilities at all, `noNewPrivileges`, rlimits, Docker's
  masked and read-only /proc and /sys paths, and a seccomp deny list;
- memory, cpu and pids limits in a cgroup of its own under `treadle/`, named after the
  container, so that `tools.sweep` can find what a crashed Shuttle left behind.

The result pipe: the program writes its result to fd 3. crun and runc pass the runtime's own
fd 3 through (`--preserve-fds 1`), as does a runsc with `--pass-fd`. An older runsc cannot:
then the bundle carries a FIFO that the sandbox may open (`--host-fifo=open`), the program is
started through `/bin/sh` to open it as fd 3, and Shuttle holds the FIFO's read end as if it
were a pipe (see `Bundle.open_result`).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import secrets
import shutil
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from treadle.domain.resources import Resources
from treadle.protocol.messages import AssignSpec
from treadle.shuttle.oci.rootfs import RESULT_DIR, WORK_DIR, Rootfs, mount_point
from treadle.shuttle.sandbox.cgroups import UNTHROTTLED_BPS, block_devices, cpu_bandwidth
from treadle.shuttle.sandbox.ids import DEFAULT_BASE, SANDBOX_GID, SANDBOX_UID, SLOT_SIZE
from treadle.shuttle.sandbox.policy import (
    ARGS_FILE,
    MASKED_PATHS,
    PATH,
    READONLY_PATHS,
    RESULT_FD,
)
from treadle.shuttle.sandbox.seccomp import arch_for_machine, oci_profile

__all__ = [
    "CGROUP_PARENT",
    "CONTAINER_PREFIX",
    "WORK_DIR",
    "Bundle",
    "BundleError",
    "IdMap",
    "Identity",
    "Limits",
    "RuntimeTraits",
    "assign_environment",
    "build_config",
    "cgroups_path",
    "new_container_id",
    "prepare_bundle",
    "seccomp_profile",
]

CONTAINER_PREFIX = "treadle-"
CGROUP_PARENT = "treadle"
_RESULT_FIFO = "result"
_SPEC_VERSION = "1.0.2"
_MIB = 1024 * 1024

_CONTAINER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


class BundleError(Exception):
    """The attempt cannot be described as a bundle (a fault of the request or the image,
    not of the node): e.g. an image without /bin/sh where the result FIFO needs one."""


@dataclass(frozen=True, slots=True)
class Limits:
    """What the sandbox may consume. `cpu_millicores` becomes a CFS quota, `pids` caps the
    cgroup's tasks (threads included), `nproc` and `nofile` are rlimits of the program."""

    memory_mib: int = 256
    cpu_millicores: int = 1000
    pids: int = 256
    nofile: int = 1024
    nproc: int = 256
    tmp_mib: int = 64

    @classmethod
    def from_resources(cls, resources: Resources, **overrides: int) -> Limits:
        return cls(
            memory_mib=resources.memory_mib,
            cpu_millicores=resources.cpu_millicores,
            tmp_mib=max(1, resources.disk_mib),
            **overrides,
        )

    @property
    def cpu_quota_us(self) -> int:
        return cpu_bandwidth(self.cpu_millicores)[0]

    @property
    def cpu_period_us(self) -> int:
        return cpu_bandwidth(self.cpu_millicores)[1]


@dataclass(frozen=True, slots=True)
class RuntimeTraits:
    """What a bundle must do differently for the runtime that will run it (see
    `tools.OciTool.traits`): carry a result FIFO, keep clone3 out of the seccomp profile,
    and leave room in the cgroup for the runtime's own processes and memory."""

    result_fifo: bool = False
    seccomp_clone3: bool = True
    pids_per_task: int = 1
    pids_overhead: int = 0
    memory_overhead_mib: int = 0
    cpu_overhead_millicores: int = 0


_NATIVE = RuntimeTraits()


@dataclass(frozen=True, slots=True)
class IdMap:
    """Container ids [0, size) map to host ids [host_start, host_start + size)."""

    host_start: int = DEFAULT_BASE
    size: int = SLOT_SIZE


@dataclass(frozen=True, slots=True)
class Identity:
    """Who the program runs as. With `userns` it gets a user namespace and (uid, gid) are
    ids inside it; without, they are host ids and the program is only as contained as an
    unprivileged host user without capabilities."""

    uid: int = SANDBOX_UID
    gid: int = SANDBOX_GID
    userns: IdMap | None = field(default_factory=IdMap)
    # Given any, the program starts as the user namespace's root with these (and no others),
    # to act as (uid, gid) and any other user; its work dir is still (uid, gid)'s.
    capabilities: tuple[str, ...] = ()

    @property
    def host_uid(self) -> int:
        return self.uid + (self.userns.host_start if self.userns else 0)

    @property
    def host_gid(self) -> int:
        return self.gid + (self.userns.host_start if self.userns else 0)


@dataclass(frozen=True, slots=True)
class Bundle:
    """A bundle directory on disk. `result_fifo` is set when fd 3 travels through a FIFO
    instead of the runtime's own fd 3."""

    path: Path
    container_id: str
    cgroups_path: str
    result_fifo: Path | None = None

    @property
    def config_path(self) -> Path:
        return self.path / "config.json"

    def config(self) -> dict[str, Any]:
        loaded: dict[str, Any] = json.loads(self.config_path.read_bytes())
        return loaded

    def open_result(self) -> tuple[int, int]:
        """The result channel: (read end for Shuttle, non-blocking; end to give the runtime
        process as its fd 3). Close the second in the parent once the runtime is spawned.

        With a FIFO the runtime does not forward its fd 3, but holding the write end keeps
        the reader from seeing end-of-file before the program opened the FIFO, and ends it
        (like a pipe's) once both the runtime and the program are gone."""
        if self.result_fifo is None:
            read, write = os.pipe2(os.O_CLOEXEC)
            os.set_blocking(read, False)
            return read, write
        read = os.open(self.result_fifo, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            write = os.open(self.result_fifo, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            os.close(read)
            raise
        return read, write

    def remove(self) -> None:
        """Remove the bundle directory (after the runtime's `delete`)."""
        shutil.rmtree(self.path, ignore_errors=True)


def new_container_id(execution_id: str, attempt: int) -> str:
    """A container id unique per attempt (a random suffix, since an attempt may be assigned
    again after a crash while its old container still exists), with the prefix `sweep`
    looks for. Runtimes accept [A-Za-z0-9_.-]; anything else in the id is replaced."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", execution_id)[:64]
    return f"{CONTAINER_PREFIX}{safe}-{attempt}-{secrets.token_hex(4)}"


def cgroups_path(container_id: str, parent: str = CGROUP_PARENT) -> str:
    return f"/{parent.strip('/')}/{container_id}"


def assign_environment(spec: AssignSpec) -> dict[str, str]:
    """The program's own variables for an AssignSpec: the function's env and the treadle
    ones (`build_config` adds PATH, HOME and the args and result conventions)."""
    env = dict(spec.env)
    env.update(
        TREADLE_EXECUTION_ID=spec.id,
        TREADLE_ATTEMPT=str(spec.attempt),
        TREADLE_FUNCTION=spec.function,
    )
    return env


def seccomp_profile(machine: str | None = None, *, clone3: bool = True) -> dict[str, Any]:
    """The sandbox layer's seccomp policy in OCI form, for `machine` (default: this one)."""
    arch = arch_for_machine(machine)
    if arch is None:
        raise BundleError(f"no seccomp table for {machine or platform.machine()}")
    return oci_profile(arch, clone3=clone3)


def build_config(
    *,
    argv: Sequence[str],
    env: Mapping[str, str],
    rootfs: Rootfs,
    workdir: Path,
    container_id: str,
    limits: Limits,
    identity: Identity,
    traits: RuntimeTraits = _NATIVE,
    result_fifo_dir: Path | None = None,
    seccomp: bool = True,
    cgroup_parent: str = CGROUP_PARENT,
    hostname: str = "sandbox",
    binds: Sequence[tuple[Path, str]] = (),
    home: str = WORK_DIR,
    args_file: bool = True,
) -> dict[str, Any]:
    """The OCI runtime-spec config.json for one attempt (see the module docstring).
    `result_fifo_dir`, when set, is a host directory holding the result FIFO: it is
    mounted at RESULT_DIR and the program is started through /bin/sh to open it as
    fd 3. `seccomp=False` leaves the seccomp filter out. `binds`: host directories
    (source, mount point) shown read-only inside, whose mount points the rootfs has."""
    if not argv:
        raise BundleError("argv is empty")
    if not _CONTAINER_ID.fullmatch(container_id):
        raise BundleError(f"invalid container id {container_id!r}")
    process_args = list(argv)
    if result_fifo_dir is not None:
        # "$0" keeps the path out of the script's text; exec replaces the shell, so the
        # program is the container's pid 1 as it is without the FIFO.
        process_args = [
            "/bin/sh",
            "-c",
            'exec 3>"$0" && exec "$@"',
            f"{RESULT_DIR}/{_RESULT_FIFO}",
            *argv,
        ]
    return {
        "ociVersion": _SPEC_VERSION,
        "process": {
            "terminal": False,
            "user": {"uid": 0, "gid": 0, "additionalGids": []}
            if identity.capabilities
            else {"uid": identity.uid, "gid": identity.gid, "additionalGids": []},
            "args": process_args,
            "env": _environment(rootfs.env, env, home, args_file),
            "cwd": home,
            "capabilities": {
                "bounding": list(identity.capabilities),
                "effective": list(identity.capabilities),
                "inheritable": [],
                "permitted": list(identity.capabilities),
                "ambient": [],
            },
            "rlimits": [
                {"type": "RLIMIT_NOFILE", "hard": limits.nofile, "soft": limits.nofile},
                {"type": "RLIMIT_NPROC", "hard": limits.nproc, "soft": limits.nproc},
                {"type": "RLIMIT_CORE", "hard": 0, "soft": 0},
            ],
            "noNewPrivileges": True,
            "oomScoreAdj": 1000,
        },
        "root": {"path": str(rootfs.path), "readonly": True},
        "hostname": hostname,
        "mounts": _mounts(rootfs, workdir, limits, result_fifo_dir, binds, home),
        "annotations": {"org.treadle.container": container_id},
        "linux": _linux(
            cgroups_path(container_id, cgroup_parent),
            limits,
            identity,
            traits,
            seccomp_profile(clone3=traits.seccomp_clone3) if seccomp else None,
        ),
    }


def prepare_bundle(
    bundles_dir: Path,
    *,
    container_id: str,
    argv: Sequence[str],
    env: Mapping[str, str],
    rootfs: Rootfs,
    workdir: Path,
    limits: Limits,
    identity: Identity,
    traits: RuntimeTraits = _NATIVE,
    seccomp: bool = True,
    cgroup_parent: str = CGROUP_PARENT,
    binds: Sequence[tuple[Path, str]] = (),
    home: str = WORK_DIR,
    args_file: bool = True,
) -> Bundle:
    """Write a bundle for one attempt into `bundles_dir/<container_id>` and hand `workdir`
    (already filled with the args file and source) to the sandbox's user. `traits` come
    from the tool that will run it (`OciTool.traits`). `binds`: host directories (source,
    mount point) shown read-only inside; their mount points are made in the rootfs where
    missing (BundleError where the image has something else there), as is `home`'s, where
    the work dir is mounted (default WORK_DIR).

    With a user namespace and a runtime that needs the result FIFO (an old runsc), the
    directories above `bundles_dir` and `workdir` must be traversable by others (mode
    0711): runsc's gofer opens them as the namespace's unprivileged root."""
    workdir = workdir.resolve()
    if not workdir.is_dir():
        raise BundleError(f"work directory {workdir} does not exist")
    if not rootfs.path.is_dir() or rootfs.path.is_symlink():
        raise BundleError(f"rootfs {rootfs.path} is not a directory")
    try:
        for _, target in binds:
            mount_point(rootfs, target)
        if home != WORK_DIR:
            mount_point(rootfs, home)
    except ValueError as exc:
        raise BundleError(str(exc)) from exc
    result_fifo = traits.result_fifo
    if result_fifo and not _has_shell(rootfs):
        raise BundleError(
            f"image {rootfs.reference!r} has no /bin/sh, which this runtime needs to pass the "
            "result fd; use a runsc with --pass-fd (2023 or later) or an image with a shell"
        )
    path = bundles_dir.resolve() / container_id
    # Traversable, not listable: in a user namespace the gofer of runsc reaches the result
    # FIFO as an unprivileged host uid.
    path.mkdir(mode=0o711, parents=True)
    path.chmod(0o711)
    try:
        fifo_dir: Path | None = None
        fifo: Path | None = None
        if result_fifo:
            fifo_dir = path / "result"
            fifo_dir.mkdir(mode=0o755)
            fifo = fifo_dir / _RESULT_FIFO
            os.mkfifo(fifo, 0o600)
            os.chown(fifo, identity.host_uid, identity.host_gid)
        config = build_config(
            argv=argv,
            env=env,
            rootfs=rootfs,
            workdir=workdir,
            container_id=container_id,
            limits=limits,
            identity=identity,
            traits=traits,
            result_fifo_dir=fifo_dir,
            seccomp=seccomp,
            cgroup_parent=cgroup_parent,
            binds=binds,
            home=home,
            args_file=args_file,
        )
        _write_file(path / "config.json", json.dumps(config, indent=1).encode())
        _give_to(workdir, identity.host_uid, identity.host_gid)
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)
        raise
    return Bundle(path, container_id, cgroups_path(container_id, cgroup_parent), fifo)


def _environment(
    image_env: Iterable[str], env: Mapping[str, str], home: str, args_file: bool
) -> list[str]:
    merged = {"PATH": PATH, "LANG": "C.UTF-8"}
    for item in image_env:
        key, _, value = item.partition("=")
        merged[key] = value
    merged.update(env)
    # Last, so that neither the image nor the function can point them elsewhere.
    merged.update(
        HOME=home,
        # As in every tier: temporary files go to the work dir, with the attempt's files.
        TMPDIR=home,
        TREADLE_RESULT_FD=str(RESULT_FD),
    )
    if args_file:
        merged["TREADLE_ARGS_FILE"] = f"{home}/{ARGS_FILE}"
    for key, value in merged.items():
        if not key or "=" in key or "\0" in key or "\0" in value:
            raise BundleError(f"invalid environment variable {key!r}")
    return [f"{key}={value}" for key, value in merged.items()]


def _mounts(
    rootfs: Rootfs,
    workdir: Path,
    limits: Limits,
    result_fifo_dir: Path | None,
    binds: Sequence[tuple[Path, str]] = (),
    home: str = WORK_DIR,
) -> list[dict[str, Any]]:
    mounts: list[dict[str, Any]] = [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {
            "destination": "/dev",
            "type": "tmpfs",
            "source": "tmpfs",
            "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
        },
        {
            "destination": "/dev/pts",
            "type": "devpts",
            "source": "devpts",
            # No gid=5: the tty group is not mapped inside a user namespace.
            "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"],
        },
        {
            "destination": "/dev/shm",
            "type": "tmpfs",
            "source": "shm",
            "options": ["nosuid", "noexec", "nodev", "mode=1777", f"size={limits.tmp_mib * _MIB}"],
        },
        {
            "destination": "/dev/mqueue",
            "type": "mqueue",
            "source": "mqueue",
            "options": ["nosuid", "noexec", "nodev"],
        },
        {
            "destination": "/sys",
            "type": "sysfs",
            "source": "sysfs",
            "options": ["nosuid", "noexec", "nodev", "ro"],
        },
        {
            "destination": "/tmp",
            "type": "tmpfs",
            "source": "tmpfs",
            "options": ["nosuid", "nodev", "mode=1777", f"size={limits.tmp_mib * _MIB}"],
        },
        {
            "destination": home,
            "type": "bind",
            "source": str(workdir),
            "options": ["rbind", "rw", "nosuid", "nodev"],
        },
    ]
    for path in rootfs.binds:
        mounts.append(
            {
                "destination": path,
                "type": "bind",
                "source": path,
                "options": ["rbind", "ro", "nosuid", "nodev"],
            }
        )
    for source, target in binds:
        mounts.append(
            {
                "destination": target,
                "type": "bind",
                "source": str(source),
                "options": ["rbind", "ro", "nosuid", "nodev"],
            }
        )
    if result_fifo_dir is not None:
        mounts.append(
            {
                "destination": RESULT_DIR,
                "type": "bind",
                "source": str(result_fifo_dir),
                "options": ["bind", "rw", "nosuid", "nodev", "noexec"],
            }
        )
    return mounts


def _counted_io() -> dict[str, Any]:
    """Rules that make cgroup v1 count the container's disk I/O without limiting it (see
    `cgroups.UNTHROTTLED_BPS`)."""
    devices = []
    for device in block_devices():
        major, minor = device.split(":")
        devices.append({"major": int(major), "minor": int(minor), "rate": UNTHROTTLED_BPS})
    return {"throttleReadBpsDevice": devices, "throttleWriteBpsDevice": devices}


def _linux(
    cgroup: str,
    limits: Limits,
    identity: Identity,
    traits: RuntimeTraits,
    seccomp: dict[str, Any] | None,
) -> dict[str, Any]:
    memory = (limits.memory_mib + traits.memory_overhead_mib) * _MIB
    quota, period = cpu_bandwidth(limits.cpu_millicores + traits.cpu_overhead_millicores)
    namespaces = [{"type": t} for t in ("pid", "ipc", "uts", "mount", "network", "cgroup")]
    linux: dict[str, Any] = {
        "namespaces": namespaces,
        "resources": {
            "devices": [{"allow": False, "access": "rwm"}],
            # Memory plus swap equal to memory: no swap.
            "memory": {"limit": memory, "swap": memory},
            "cpu": {"quota": quota, "period": period},
            "pids": {"limit": limits.pids * traits.pids_per_task + traits.pids_overhead},
        },
        "cgroupsPath": cgroup,
        "maskedPaths": list(MASKED_PATHS),
        "readonlyPaths": list(READONLY_PATHS),
    }
    if block_devices():
        linux["resources"]["blockIO"] = _counted_io()
    if identity.userns is not None:
        namespaces.append({"type": "user"})
        mapping = [
            {"containerID": 0, "hostID": identity.userns.host_start, "size": identity.userns.size}
        ]
        linux["uidMappings"] = mapping
        linux["gidMappings"] = mapping
    if seccomp is not None:
        linux["seccomp"] = seccomp
    return linux


def _has_shell(rootfs: Rootfs) -> bool:
    if rootfs.binds:  # the host's own directories: its /bin/sh is the sandbox's
        return os.access("/bin/sh", os.X_OK)
    found = _lookup(rootfs.path, "/bin/sh")
    return found is not None and found.is_file() and os.access(found, os.X_OK)


def _lookup(root: Path, path: str) -> Path | None:
    """Where `path` inside the image `root` lies on the host, its symlinks resolved inside
    `root` (an absolute link in an image points into the image, not at the host)."""
    current = root
    parts = [p for p in path.split("/") if p and p != "."]
    hops = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            current = current.parent if current != root else root
            continue
        candidate = current / part
        if candidate.is_symlink():
            hops += 1
            if hops > 40:
                return None
            target = os.readlink(candidate)
            if target.startswith("/"):
                current = root
            parts = [p for p in target.split("/") if p and p != "."] + parts
            continue
        if not candidate.exists():
            return None
        current = candidate
    return current


def _write_file(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def _give_to(workdir: Path, uid: int, gid: int) -> None:
    # The work directory is the sandbox user's: its own files (the args file, the source)
    # must be readable by it, and its directories writable.
    for dirpath, dirnames, filenames in os.walk(workdir):
        for name in (*dirnames, *filenames):
            with contextlib.suppress(FileNotFoundError):
                os.chown(os.path.join(dirpath, name), uid, gid, follow_symlinks=False)
    os.chown(workdir, uid, gid)
