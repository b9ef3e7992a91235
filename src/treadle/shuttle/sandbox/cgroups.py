"""Resource limits of sandboxed attempts through cgroups, v2 or v1, whichever the host has.

Detected once, at start: the unified hierarchy (v2) is used when it offers the memory and pids
controllers; otherwise the v1 hierarchies that carry them (hybrid hosts mount cgroup2 with few
or no controllers next to the v1 ones). Each attempt gets one group (v2) or one group per v1
hierarchy, named `treadle/<name>` from the root of the hierarchy: groups are created where this
process can write, never below the group this process itself sits in, which belongs to
whoever started it.

A group's name starts with its owner's prefix so that a Shuttle can find what its previous
incarnation left behind (it was SIGKILLed, say) and sweep it at start, without touching the
groups of another Shuttle on the same host.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import logging
import os
import re
import signal
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from treadle.domain.resources import Resources

__all__ = [
    "PARENT",
    "UNTHROTTLED_BPS",
    "Cgroups",
    "Group",
    "GroupUsage",
    "Layout",
    "Limits",
    "block_devices",
    "cgroup_roots",
    "cpu_bandwidth",
    "detect",
    "limit_writes",
    "parse_mountinfo",
]

log = logging.getLogger(__name__)

PARENT = "treadle"
_MIB = 1024 * 1024
CPU_PERIOD_US = 100_000
_CPU_PERIOD_MAX_US = 1_000_000  # the kernel's largest cfs period
_CPU_QUOTA_MIN_US = 1_000  # the kernel refuses a smaller cfs quota
# The CPU time a sandbox may use in one go before its share throttles it. A sandbox's own
# set-up (bubblewrap's mounts, an OCI runtime's init) runs in its group and takes a few ms of
# CPU: at 10 millicores and the usual 100 ms period (a 1 ms quota) that set-up alone waited
# out one or two periods, and `echo` took 100-200 ms where it takes 5 ms unthrottled.
CPU_BURST_US = 20_000
_WANTED = ("memory", "pids", "cpu", "io")
_V1_CONTROLLERS = ("memory", "pids", "cpu", "cpuacct", "freezer", "blkio")
# v1's blkio counts a group's I/O on a device only where the group has a throttle rule for
# it; a rule far above what any device moves makes it count without ever slowing it.
UNTHROTTLED_BPS = 2**60
# A group's last task may still be leaving it (v1 in particular) when we first try rmdir.
_SWEEP_RETRIES = 100
_SWEEP_RETRY_S = 0.01

_OCTAL = re.compile(r"\\([0-7]{3})")

Version = Literal[1, 2]


def cpu_bandwidth(millicores: int) -> tuple[int, int]:
    """(quota, period) in microseconds of the CFS bandwidth that gives `millicores`: the
    share over the usual 100 ms period, or over a longer one (up to the kernel's 1 s) for a
    share too small to run `CPU_BURST_US` in one period. The share is the same; a small one
    comes in fewer, larger slices, so that short programs are not throttled by their own
    start. Every tier applies this one rule."""
    period = CPU_PERIOD_US
    if millicores * period // 1000 < CPU_BURST_US:
        period = min(_CPU_PERIOD_MAX_US, -(-CPU_BURST_US * 1000 // millicores))
    return max(_CPU_QUOTA_MIN_US, millicores * period // 1000), period


@dataclass(frozen=True, slots=True)
class Limits:
    memory_bytes: int | None = None
    cpu_quota_us: int | None = None
    pids_max: int | None = None
    cpu_period_us: int = CPU_PERIOD_US
    io_devices: tuple[str, ...] = ()  # "major:minor" of the disks whose I/O is counted

    @classmethod
    def for_resources(cls, resources: Resources, pids_max: int | None) -> Limits:
        quota, period = cpu_bandwidth(resources.cpu_millicores)
        return cls(
            memory_bytes=resources.memory_mib * _MIB,
            cpu_quota_us=quota,
            pids_max=pids_max,
            cpu_period_us=period,
            io_devices=block_devices(),
        )


@functools.cache
def block_devices(sys_block: str = "/sys/block") -> tuple[str, ...]:
    """ "major:minor" of this host's disks (not loop, RAM or compressed-RAM devices), where
    its workloads' storage I/O goes, when they need a rule for it to be counted: on hosts
    that use v1's blkio hierarchy (v2 counts every group's I/O)."""
    layout, _ = detect()
    if layout is None or layout.version != 1 or not layout.has("blkio"):
        return ()
    found = []
    with contextlib.suppress(OSError):
        for entry in sorted(os.scandir(sys_block), key=lambda e: e.name):
            if entry.name.startswith(("loop", "ram", "zram")):
                continue
            with contextlib.suppress(OSError):
                number = Path(entry.path, "dev").read_text().strip()
                if re.fullmatch(r"\d+:\d+", number):
                    found.append(number)
    return tuple(found)


@dataclass(frozen=True, slots=True)
class GroupUsage:
    oom_kills: int = 0
    pids_denied: int = 0  # forks refused by pids.max
    cpu_ns: int | None = None
    peak_bytes: int | None = None
    memory_bytes: int | None = None  # held now
    disk_read_bytes: int | None = None
    disk_write_bytes: int | None = None
    # Not a cgroup's: the bytes on the workload's network interfaces, where its tier reads them.
    net_in_bytes: int | None = None
    net_out_bytes: int | None = None

    def since(self, earlier: GroupUsage) -> GroupUsage:
        """What was counted after `earlier` (a read of the same group): the running totals
        less theirs then; what is held now, and the peak, as they are."""

        def less(now: int | None, then: int | None) -> int | None:
            return now if now is None or then is None else max(0, now - then)

        return dataclasses.replace(
            self,
            oom_kills=max(0, self.oom_kills - earlier.oom_kills),
            pids_denied=max(0, self.pids_denied - earlier.pids_denied),
            cpu_ns=less(self.cpu_ns, earlier.cpu_ns),
            disk_read_bytes=less(self.disk_read_bytes, earlier.disk_read_bytes),
            disk_write_bytes=less(self.disk_write_bytes, earlier.disk_write_bytes),
            net_in_bytes=less(self.net_in_bytes, earlier.net_in_bytes),
            net_out_bytes=less(self.net_out_bytes, earlier.net_out_bytes),
        )

    def with_disk(self, disk: tuple[int, int] | None) -> GroupUsage:
        if disk is None:
            return self
        return dataclasses.replace(self, disk_read_bytes=disk[0], disk_write_bytes=disk[1])

    def with_net(self, net: tuple[int, int] | None) -> GroupUsage:
        if net is None:
            return self
        return dataclasses.replace(self, net_in_bytes=net[0], net_out_bytes=net[1])


@dataclass(frozen=True, slots=True)
class Layout:
    """Where attempt groups go: for each controller, the directory of its `treadle` parent
    (one directory for all of them on v2)."""

    version: Version
    parents: Mapping[str, Path]

    def has(self, controller: str) -> bool:
        return controller in self.parents


def limit_writes(version: Version, limits: Limits) -> dict[str, list[tuple[str, str]]]:
    """The files to write, in order, per controller, to apply `limits` to a new group."""
    writes: dict[str, list[tuple[str, str]]] = {}
    if limits.memory_bytes is not None:
        value = str(limits.memory_bytes)
        if version == 2:
            # No swap: a limit that swap can stretch is not a limit.
            writes["memory"] = [("memory.max", value), ("memory.swap.max", "0")]
        else:
            writes["memory"] = [
                ("memory.limit_in_bytes", value),
                ("memory.memsw.limit_in_bytes", value),  # must follow the plain limit
            ]
    if limits.cpu_quota_us is not None:
        if version == 2:
            writes["cpu"] = [("cpu.max", f"{limits.cpu_quota_us} {limits.cpu_period_us}")]
        else:
            writes["cpu"] = [
                ("cpu.cfs_period_us", str(limits.cpu_period_us)),
                ("cpu.cfs_quota_us", str(limits.cpu_quota_us)),
            ]
    if limits.pids_max is not None:
        writes["pids"] = [("pids.max", str(limits.pids_max))]
    if limits.io_devices:
        writes["blkio"] = [
            (f"blkio.throttle.{way}_bps_device", f"{device} {UNTHROTTLED_BPS}")
            for device in limits.io_devices
            for way in ("read", "write")
        ]
    return writes


def parse_mountinfo(text: str) -> tuple[Path | None, dict[str, Path]]:
    """(the cgroup2 mount point, {v1 controller: its mount point}); first mount wins."""
    unified: Path | None = None
    v1: dict[str, Path] = {}
    for line in text.splitlines():
        before, sep, after = line.partition(" - ")
        if not sep:
            continue
        fields = before.split()
        rest = after.split()
        if len(fields) < 5 or len(rest) < 3:
            continue
        mount_point = Path(_unescape(fields[4]))
        fstype, options = rest[0], rest[2].split(",")
        if fstype == "cgroup2" and unified is None:
            unified = mount_point
        elif fstype == "cgroup":
            for option in options:
                if option in _V1_CONTROLLERS:
                    v1.setdefault(option, mount_point)
    return unified, v1


def detect(mountinfo: str | None = None) -> tuple[Layout | None, str]:
    """The layout to use here and a line saying what was found (for the log)."""
    if mountinfo is None:
        try:
            mountinfo = Path("/proc/self/mountinfo").read_text()
        except OSError as exc:
            return None, f"cannot read the mount table: {exc}"
    unified, v1 = parse_mountinfo(mountinfo)
    if unified is not None:
        available = _read_words(unified / "cgroup.controllers")
        if {"memory", "pids"} <= available:
            if not os.access(unified, os.W_OK):
                return None, f"cgroup v2 at {unified} is not writable by this user"
            controllers = [c for c in _WANTED if c in available]
            parent = unified / PARENT
            return Layout(2, dict.fromkeys(controllers, parent)), (
                f"cgroup v2 at {unified} ({', '.join(controllers)})"
            )
    usable = {c: path for c, path in v1.items() if os.access(path, os.W_OK)}
    if "memory" in usable or "pids" in usable:
        parents = {c: path / PARENT for c, path in usable.items()}
        return Layout(1, parents), f"cgroup v1 ({', '.join(sorted(parents))})"
    if v1 or unified is not None:
        return None, "cgroups are mounted but offer no writable memory or pids controller"
    return None, "no cgroup file system is mounted"


class Cgroups:
    """Creates, inspects and removes the groups of attempts under one layout."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        for parent in set(layout.parents.values()):
            parent.mkdir(exist_ok=True)
        if layout.version == 2:
            (parent,) = set(layout.parents.values())
            enable = " ".join(f"+{c}" for c in layout.parents)
            # The parent of `treadle` may already delegate them; writing twice is harmless.
            _write(parent.parent / "cgroup.subtree_control", enable)
            _write(parent / "cgroup.subtree_control", enable)

    def create(self, name: str, limits: Limits, *, freezable: bool = False) -> Group:
        """A new group named `name` with `limits`; `freezable` (a workload that may be
        paused) also places it in v1's freezer hierarchy, which costs one more migration."""
        group = Group(self.layout, name, freezable=freezable)
        try:
            for directory in group.dirs:
                directory.mkdir()
            for controller, writes in limit_writes(self.layout.version, limits).items():
                if controller not in self.layout.parents:
                    continue
                directory = self.layout.parents[controller] / name
                for filename, value in writes:
                    path = directory / filename
                    if filename.startswith(("memory.memsw.", "memory.swap.")) and not (
                        path.exists()
                    ):
                        continue  # no swap accounting on this kernel: nothing to stretch
                    if controller == "blkio":
                        # Counting, not limiting: a disk that takes no rule is not counted.
                        with contextlib.suppress(OSError):
                            _write(path, value)
                        continue
                    _write(path, value)
        except BaseException:
            group.remove()
            raise
        return group

    def sweep(self, stale: Callable[[str], bool]) -> list[str]:
        """Kill the tasks of, and remove, every group whose name `stale` accepts; returns
        the names of those that could not be removed."""
        names: set[str] = set()
        for parent in set(self.layout.parents.values()):
            with contextlib.suppress(FileNotFoundError):
                names.update(e.name for e in os.scandir(parent) if e.is_dir() and stale(e.name))
        return [
            name for name in sorted(names) if Group(self.layout, name, freezable=True).destroy()
        ]


class Group:
    """One workload's group: a directory per hierarchy (one on v2). Made by `Cgroups.create`
    for a tier that creates its own, or found with `Group.at` where a tool (an OCI runtime)
    made it at a path of its choosing; either way it is read, frozen, killed and removed
    here."""

    def __init__(self, layout: Layout, name: str, *, freezable: bool = True) -> None:
        if not name or "/" in name or name in (".", ".."):
            raise ValueError(f"invalid cgroup name {name!r}")
        self.name = name
        self._version = layout.version
        self._counters = {
            c: parent / name for c, parent in layout.parents.items() if freezable or c != "freezer"
        }
        self.dirs = sorted(set(self._counters.values()))

    @classmethod
    def at(cls, path: str, mountinfo: str | None = None) -> Group:
        """The group at `path` (from the root of each hierarchy), in every hierarchy where
        it exists: the counted controllers' and the others an OCI runtime also uses
        (devices, freezer, ...), so that removing it leaves nothing behind."""
        relative = path.strip("/")
        if not relative or any(part in ("", ".", "..") for part in relative.split("/")):
            raise ValueError(f"invalid cgroup path {path!r}")
        if mountinfo is None:
            try:
                mountinfo = Path("/proc/self/mountinfo").read_text()
            except OSError:
                mountinfo = ""
        unified, v1 = parse_mountinfo(mountinfo)
        group = cls.__new__(cls)
        group.name = relative
        group._version = 1 if "memory" in v1 else 2
        if group._version == 2 and unified is not None:
            group._counters = dict.fromkeys(_WANTED, unified / relative)
        else:
            group._counters = {c: root / relative for c, root in v1.items()}
        roots = cgroup_roots(mountinfo)
        group.dirs = sorted({root / relative for root in roots if (root / relative).is_dir()})
        return group

    def _dir(self, controller: str) -> Path | None:
        return self._counters.get(controller)

    def place(self, pid: int) -> None:
        """Move `pid` (the whole process) into the group; its future children follow."""
        for directory in self.dirs:
            _write(directory / "cgroup.procs", str(pid))

    def pids(self) -> set[int]:
        found: set[int] = set()
        for directory in self.dirs:
            with contextlib.suppress(FileNotFoundError):
                found.update(int(p) for p in (directory / "cgroup.procs").read_text().split())
        return found

    def kill(self) -> None:
        """SIGKILL every task in the group."""
        if self._version == 2 and self.dirs:
            with contextlib.suppress(FileNotFoundError):
                kill_file = self.dirs[0] / "cgroup.kill"
                if kill_file.exists():  # Linux 5.14+: atomic, no fork race
                    _write(kill_file, "1")
                    return
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)

    def freeze(self) -> None:
        """Stop every task of the group where it stands (v2 `cgroup.freeze`, v1 freezer);
        memory and open files are kept. `frozen()` tells once the kernel is done."""
        self._set_frozen(True)

    def thaw(self) -> None:
        self._set_frozen(False)

    def freeze_and_wait(self, timeout_s: float = 10.0) -> None:
        """`freeze`, returning once the kernel has stopped every task (v1 goes through
        FREEZING, v2 through `frozen 0`, while tasks reach a point where they can stop);
        OSError if that takes longer than `timeout_s` (a task stuck in the kernel)."""
        self.freeze()
        deadline = time.monotonic() + timeout_s
        pause = 0.0005
        while not self.frozen():
            if time.monotonic() > deadline:
                raise OSError(errno.ETIMEDOUT, "the group did not freeze")
            time.sleep(pause)  # the kernel offers no event to wait on for v1's freezer
            pause = min(pause * 2, 0.01)

    def frozen(self) -> bool:
        if self._version == 2:
            return _key(self._dir("memory"), "cgroup.events", "frozen") == 1
        freezer = self._dir("freezer")
        if freezer is None:
            return False
        with contextlib.suppress(OSError):
            return (freezer / "freezer.state").read_text().strip() == "FROZEN"
        return False

    def _set_frozen(self, frozen: bool) -> None:
        if self._version == 2:
            directory = self._dir("memory")
            if directory is None:
                raise OSError(errno.ENOTSUP, "no cgroup to freeze")
            _write(directory / "cgroup.freeze", "1" if frozen else "0")
            return
        freezer = self._dir("freezer")
        if freezer is None:
            raise OSError(errno.ENOTSUP, "this host mounts no v1 freezer hierarchy")
        _write(freezer / "freezer.state", "FROZEN" if frozen else "THAWED")

    def usage(self) -> GroupUsage:
        """What the group's tasks used and ran into, from the controllers' own counters."""
        if self._version == 2:
            memory = self._dir("memory")
            cpu = self._dir("cpu")
            pids = self._dir("pids")
            return GroupUsage(
                oom_kills=_key(memory, "memory.events", "oom_kill") or 0,
                pids_denied=_key(pids, "pids.events", "max") or 0,
                cpu_ns=_times(_key(cpu, "cpu.stat", "usage_usec"), 1000),
                peak_bytes=_number(memory, "memory.peak"),
                memory_bytes=_number(memory, "memory.current"),
            ).with_disk(_io_stat(self._dir("io")))
        memory = self._dir("memory")
        return GroupUsage(
            oom_kills=_key(memory, "memory.oom_control", "oom_kill") or 0,
            pids_denied=_key(self._dir("pids"), "pids.events", "max") or 0,
            cpu_ns=_number(self._dir("cpuacct"), "cpuacct.usage"),
            peak_bytes=_number(memory, "memory.max_usage_in_bytes"),
            memory_bytes=_number(memory, "memory.usage_in_bytes"),
        ).with_disk(_blkio(self._dir("blkio")))

    def remove(self) -> list[Path]:
        """rmdir what is left of the group; returns the directories still busy."""
        busy = []
        for directory in self.dirs:
            try:
                directory.rmdir()
            except FileNotFoundError:
                pass
            except OSError as exc:
                if exc.errno != errno.EBUSY:
                    raise
                busy.append(directory)
        return busy

    def destroy(self) -> list[str]:
        """Kill what runs in the group and remove it with the groups below it (a tool may
        make some), retrying while the kernel still releases them (a blocking call, for a
        cleanup thread or a sweep). Returns the errors; empty once it is gone."""
        errors: list[str] = []
        # A frozen group's tasks (a paused sandbox's) take no signal until thawed, and no
        # controller's directory of theirs can go before they do.
        frozen_by = (
            self._counters.get("freezer") if self._version == 1 else next(iter(self.dirs), None)
        )
        if frozen_by is not None:
            _thaw(frozen_by)
        for directory in self.dirs:
            _destroy_dir(directory, errors)
        return errors


def cgroup_roots(mountinfo: str) -> list[Path]:
    """Every mounted cgroup hierarchy (v1, whatever its controllers, and v2)."""
    roots: list[Path] = []
    for line in mountinfo.splitlines():
        before, sep, after = line.partition(" - ")
        fields, rest = before.split(), after.split()
        if sep and len(fields) >= 5 and rest and rest[0] in ("cgroup", "cgroup2"):
            roots.append(Path(_unescape(fields[4])))
    return roots


def _destroy_dir(directory: Path, errors: list[str]) -> bool:
    # rmdir fails with EBUSY while tasks or groups below remain, and for a moment after the
    # last task exits (v1 above all): only then are tasks killed and groups below looked for
    # (a cgroup's directory holds dozens of files, and this runs once per workload).
    for _ in range(_SWEEP_RETRIES):
        try:
            directory.rmdir()
            return True
        except FileNotFoundError:
            return True
        except OSError as exc:
            if exc.errno != errno.EBUSY:
                errors.append(f"{directory}: {exc.strerror}")
                return False
        _kill_tasks(directory)
        for child in _child_groups(directory):
            _destroy_dir(child, errors)
        time.sleep(_SWEEP_RETRY_S)
    errors.append(f"{directory}: still busy")
    return False


def _child_groups(directory: Path) -> list[Path]:
    try:
        with os.scandir(directory) as entries:
            return [Path(e.path) for e in entries if e.is_dir(follow_symlinks=False)]
    except FileNotFoundError:
        return []


def _kill_tasks(directory: Path) -> None:
    try:
        pids = (directory / "cgroup.procs").read_text().split()
    except OSError:
        return
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError, ValueError):
            os.kill(int(pid), signal.SIGKILL)
    _thaw(directory)


def _thaw(directory: Path) -> None:
    """Thaw a group that may be frozen (a paused sandbox's): its tasks take no signal, not
    even SIGKILL, until they are, and its directory cannot go while they live."""
    for name, value in (("freezer.state", "THAWED"), ("cgroup.freeze", "0")):
        with contextlib.suppress(OSError):
            _write(directory / name, value)


def _write(path: Path, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _read_words(path: Path) -> set[str]:
    try:
        return set(path.read_text().split())
    except OSError:
        return set()


def _number(directory: Path | None, filename: str) -> int | None:
    if directory is None:
        return None
    try:
        return int((directory / filename).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _key(directory: Path | None, filename: str, key: str) -> int | None:
    """The value of `key` in a flat-keyed file ("key value" per line)."""
    if directory is None:
        return None
    try:
        lines: Iterable[str] = (directory / filename).read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        name, _, value = line.partition(" ")
        if name == key:
            with contextlib.suppress(ValueError):
                return int(value)
    return None


def _io_stat(directory: Path | None) -> tuple[int, int] | None:
    """Bytes read and written, summed over devices, from v2's `io.stat`
    ("8:0 rbytes=1 wbytes=2 rios=3 ...")."""
    if directory is None:
        return None
    try:
        lines = (directory / "io.stat").read_text().splitlines()
    except OSError:
        return None
    read = written = 0
    for line in lines:
        for field in line.split()[1:]:
            name, _, value = field.partition("=")
            if name in ("rbytes", "wbytes") and value.isdigit():
                if name == "rbytes":
                    read += int(value)
                else:
                    written += int(value)
    return read, written


def _blkio(directory: Path | None) -> tuple[int, int] | None:
    """Bytes read and written, summed over devices, from v1's blkio throttle counters
    ("8:0 Read 1", "8:0 Write 2", ..., "Total 3"), the group's and its descendants'."""
    if directory is None:
        return None
    text = None
    for name in ("recursive", None):
        filename = "blkio.throttle.io_service_bytes" + (f"_{name}" if name else "")
        with contextlib.suppress(OSError):
            text = (directory / filename).read_text()
            break
    if text is None:
        return None
    read = written = 0
    for line in text.splitlines():
        fields = line.split()
        if len(fields) == 3 and fields[2].isdigit():
            if fields[1] == "Read":
                read += int(fields[2])
            elif fields[1] == "Write":
                written += int(fields[2])
    return read, written


def _times(value: int | None, factor: int) -> int | None:
    return None if value is None else value * factor


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo.
    return _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), field)
