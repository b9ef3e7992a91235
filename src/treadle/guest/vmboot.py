"""The step between a microVM guest's init and its workload's first program.

The guest's init knows nothing of the workload; the node attached a config disk that says
it (JSON padded with NULs, at the path in `TREADLE_AGENT_CONFIG`): the program to run (the
guest agent, as in every tier), its environment, the wall-clock time to take, and the
confinement every tier gives sandboxed code. Here, as the guest's root, it:

- where the VM was booted ahead of its workload (a node's warm pool), says so on its
  channel (`WAITING`) and waits there for the rest of its settings (the workload's
  environment and the node's time), sent by the node as one frame (`settings_frame`) when
  it hands the VM over; nothing of the workload's is known to the guest before then;
- sets the guest's clock to the node's (the guest's own starts from a one-second RTC): the
  node's time as it handed the VM over, or, booted for its workload, as it prepared the VM
  plus the guest's own time since its kernel started (so behind by QEMU's own start-up, a
  fraction of a second);
- drops from the bounding set every capability but those the node lists, so a process that
  runs as the sandbox's root holds those and nothing more, as in the other tiers;
- holds the workload to its limits within the guest as the other tiers do on the host: a
  cgroup (memory, pids) for the agent and all it starts, the size of its writable places
  (its home, /tmp, /dev/shm: tmpfs each sized to its disk, unless they are on its scratch
  disk, whose size bounds them together), and no core dumps; and it masks, or makes read-only, the
  paths the other tiers do (/proc/sys among them: the guest's root is its kernel's root);
- where the workload has network, sets up the guest's interface and the node's fence in its
  routes (the same prefixes the namespace tier prohibits);
- sets no_new_privs and installs the node's seccomp filter (the sandbox layer's, the same
  program bubblewrap installs), so the agent and all it starts meet the same system-call
  policy as everywhere else, even though the guest's kernel is the boundary here;
- then executes the program, with exactly the given environment, as the sandbox's user where
  the sandbox has no users of its own (its agent settles as that user itself otherwise).
  Where the program is this very interpreter, with these very options, given source to run
  (the guest agent, always), the source runs in this process instead: compiled and its
  definitions loaded before the VM waits (so a warm VM has done that too), its `main()`
  called once the process holds exactly what an executed one would (its capabilities
  those its bounding set left, its environment and arguments the given ones). That saves
  a Python start and the compilation, most of a start under emulation.

Standard library only (and no `typing`: the agent runtime's Python lacks it); nothing is
left running.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
import time

_PR_CAPBSET_DROP = 24
_PR_SET_NO_NEW_PRIVS = 38
_PR_SET_SECCOMP = 22
_SECCOMP_MODE_FILTER = 2
_CLOCK_REALTIME = 0
_MS_RDONLY = 1
_MS_NOSUID = 2
_MS_NODEV = 4
_MS_REMOUNT = 32
_MS_BIND = 4096
_MS_REC = 16384
_RLIMIT_CORE = 4
_PR_CAP_AMBIENT = 47
_PR_CAP_AMBIENT_CLEAR_ALL = 4
_SYS_CAPSET = 126  # x86-64
_CAPABILITY_VERSION_3 = 0x20080522
# What a VM booted ahead of its workload writes on its channel once it waits for settings.
WAITING = b"treadle: booted, waiting for the workload\n"
# The settings frame: a 4-byte big-endian length, then that much JSON.
_SETTINGS_MAX = 1 << 22
# The most of a config disk that is read: its JSON must end before.
CONFIG_MAX = 1 << 22


class _Filter(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


class _Timespec(ctypes.Structure):
    _fields_ = [("sec", ctypes.c_long), ("nsec", ctypes.c_long)]


def read_config(path: str) -> dict:
    with open(path, "rb") as f:
        data = f.read(CONFIG_MAX)
    config: dict = json.JSONDecoder().raw_decode(data.split(b"\0", 1)[0].decode())[0]
    return config


def settings_frame(settings: dict) -> bytes:
    """What the node sends a waiting VM: the settings its config disk left out."""
    data = json.dumps(settings, ensure_ascii=True).encode()
    if len(data) > _SETTINGS_MAX:
        raise ValueError("the workload's settings are too large for its VM")
    return len(data).to_bytes(4, "big") + data


def _read_exactly(fd: int, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = os.read(fd, size - len(data))
        if not chunk:
            raise OSError("the node closed the channel before the settings came")
        data += chunk
    return data


def await_settings() -> dict:
    """Say the VM waits, on its channel (stdout), and read the settings frame from it (stdin)."""
    view = memoryview(WAITING)
    while view:
        view = view[os.write(1, view) :]
    size = int.from_bytes(_read_exactly(0, 4), "big")
    if size > _SETTINGS_MAX:
        raise ValueError("settings frame too large")
    settings: dict = json.loads(_read_exactly(0, size).decode())
    return settings


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


def same_interpreter(argv: list) -> object:
    """The source `argv` runs where it names this interpreter with this process's own
    options (`-I -S -c SOURCE`, as this process was started); None otherwise."""
    with open("/proc/self/cmdline", "rb") as f:
        mine = f.read().split(b"\0")[:-1]
    if len(argv) < 2 or len(mine) != len(argv) or mine[-2] != b"-c":
        return None
    if [arg.encode() for arg in argv[:-1]] != mine[:-1]:
        return None
    return argv[-1]


def load_program(source: str) -> object:
    """The program's definitions, loaded as a module (not as `__main__`: nothing runs)."""
    import types

    module = types.ModuleType("treadle_guest_program")
    module.__dict__["__builtins__"] = __builtins__
    sys.modules[module.__name__] = module
    exec(compile(source, "<string>", "exec"), module.__dict__)
    return module


def keep_only(libc: ctypes.CDLL, keep: list) -> None:
    """Hold exactly the capabilities an executed program would: as root, those its bounding
    set kept; none inheritable or ambient."""
    mask = 0
    for cap in keep:
        mask |= 1 << int(cap)
    data = (_CapData * 2)()
    for word in range(2):
        part = (mask >> (32 * word)) & 0xFFFFFFFF
        data[word].effective = data[word].permitted = part
    header = _CapHeader(_CAPABILITY_VERSION_3, 0)
    if libc.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "cannot clear the ambient capabilities")
    if libc.syscall(_SYS_CAPSET, ctypes.byref(header), ctypes.byref(data)) != 0:
        raise OSError(ctypes.get_errno(), "cannot set the capabilities")


def limit(libc: ctypes.CDLL, limits: dict) -> None:
    """The workload's cgroup in the guest's own kernel (mounted where the workload's root
    does not show it), and no core dumps."""
    group = "/sys/fs/cgroup"
    if libc.mount(b"cgroup2", group.encode(), b"cgroup2", 0, None) != 0:
        raise OSError(ctypes.get_errno(), "cannot mount cgroup2")
    with open(f"{group}/cgroup.subtree_control", "w") as f:
        f.write("+memory +pids")
    os.mkdir(f"{group}/workload")
    settings = {
        "memory.max": int(limits["memory_mib"]) << 20,
        "memory.swap.max": 0,
        "pids.max": int(limits["pids"]),
    }
    for name, value in settings.items():
        with open(f"{group}/workload/{name}", "w") as f:
            f.write(str(value))
    with open(f"{group}/workload/cgroup.procs", "w") as f:
        f.write(str(os.getpid()))
    if libc.setrlimit(_RLIMIT_CORE, ctypes.byref((ctypes.c_ulong * 2)(0, 0))) != 0:
        raise OSError(ctypes.get_errno(), "cannot turn core dumps off")


def bound_places(libc: ctypes.CDLL, limits: dict, home: object) -> None:
    """The size of the workload's writable places: each at most its disk."""
    size = f"size={int(limits['disk_mib']) << 20}".encode()
    for place in {"/tmp", "/dev/shm", str(home or "/tmp")}:
        flags = _MS_REMOUNT | _MS_NOSUID | _MS_NODEV  # a remount sets every flag anew
        if os.path.ismount(place) and libc.mount(None, place.encode(), None, flags, size) != 0:
            raise OSError(ctypes.get_errno(), f"cannot bound {place}")


def read_only(libc: ctypes.CDLL, path: str) -> None:
    """Make a path read-only, as the other tiers do: in the guest, its root is the kernel's
    own root, and /proc/sys (core_pattern, say) would otherwise be its to change."""
    if not os.path.lexists(path):
        return
    target = path.encode()
    if libc.mount(target, target, None, _MS_BIND | _MS_REC, None) != 0 or (
        libc.mount(None, target, None, _MS_BIND | _MS_REMOUNT | _MS_RDONLY, None) != 0
    ):
        raise OSError(ctypes.get_errno(), f"cannot make {path} read-only")


def mask(libc: ctypes.CDLL, path: str) -> None:
    """Hide a path of /proc as the other tiers do (though here it shows the guest's kernel,
    not the host's): an empty read-only directory, or /dev/null, over it."""
    if not os.path.lexists(path):
        return
    if os.path.isdir(path):
        done = libc.mount(b"tmpfs", path.encode(), b"tmpfs", _MS_RDONLY, b"size=0")
    else:
        done = libc.mount(b"/dev/null", path.encode(), None, _MS_BIND, None)
    if done != 0:
        raise OSError(ctypes.get_errno(), f"cannot mask {path}")


def network(settings: dict) -> None:
    """The guest's one interface, named and addressed as in the namespace tier's sandboxes,
    and the node's fence in its routes (before the chroot: busybox's `ip` is the initramfs's)."""
    steps = [
        ["link", "set", "eth0", "name", "tap0"],
        ["addr", "add", "10.0.2.100/24", "dev", "tap0"],
        ["link", "set", "tap0", "up"],
        ["route", "add", "default", "via", "10.0.2.2"],
        *(["route", "add", "prohibit", str(prefix)] for prefix in settings["fence"]),
    ]
    for step in steps:
        pid = os.fork()
        if pid == 0:
            try:
                os.execv("/bin/ip", ["ip", *step])
            finally:
                os._exit(127)
        _, status = os.waitpid(pid, 0)
        if status != 0:
            raise OSError(f"cannot set up the network: ip {' '.join(step)} failed")


def last_cap() -> int:
    with open("/proc/sys/kernel/cap_last_cap") as f:
        return int(f.read())


def main() -> None:
    config = read_config(os.environ["TREADLE_AGENT_CONFIG"])
    libc = ctypes.CDLL(None, use_errno=True)
    argv = [str(arg) for arg in config["argv"]]
    source = same_interpreter(argv)
    program = None if source is None else load_program(str(source))
    # The node's clock when QEMU started, plus the guest's time since its kernel did; or,
    # handed over from a warm pool, the node's clock as it did.
    since = time.clock_gettime(time.CLOCK_BOOTTIME)
    if config.get("settings") == "channel":
        config.update(await_settings())
        since = 0.0
    if config.get("time") is not None:
        now = float(config["time"]) + since
        spec = _Timespec(int(now), int((now % 1) * 1e9))
        libc.clock_settime(_CLOCK_REALTIME, ctypes.byref(spec))
    if config.get("network"):  # first: `ip` runs as a program, with the bounding set as is
        network(config["network"])
    keep = config.get("capabilities")
    if keep is not None:
        for cap in range(last_cap() + 1):
            if cap not in keep and libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
                raise OSError(ctypes.get_errno(), f"cannot drop capability {cap}")
    limits = config.get("limits")
    if limits:
        limit(libc, limits)
    root = os.environ.get("TREADLE_ROOT")
    if root:  # the workload's root, where the guest's init has mounted it
        os.chroot(root)
        os.chdir("/")
    home = config.get("home")  # the node's word for it, not the workload's HOME
    if limits and not config.get("scratch"):  # on a scratch disk, the disk bounds them
        bound_places(libc, limits, home)
    for path in config.get("masked") or ():
        mask(libc, str(path))
    for path in config.get("readonly") or ():
        read_only(libc, str(path))
    env = {str(k): str(v) for k, v in config["env"].items()}
    if home:
        os.makedirs(home, exist_ok=True)
        owner = config.get("user") or env.get("TREADLE_AGENT_USER", "").split(":")
        if owner and owner[0] != "":
            os.chown(home, int(owner[0]), int(owner[1]))
    if program is not None and not config.get("user"):
        # As root, what an executed program would hold (a user other than root holds
        # nothing once it becomes that user).
        keep_only(libc, list(keep if keep is not None else range(last_cap() + 1)))
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "cannot set no_new_privs")
    seccomp = config.get("seccomp")
    if seccomp:
        code = bytes.fromhex(seccomp)
        buffer = ctypes.create_string_buffer(code, len(code))
        prog = _Filter(len(code) // 8, ctypes.cast(buffer, ctypes.c_void_p))
        if libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "cannot install the seccomp filter")
    os.chdir(home or "/")
    if config.get("user"):
        uid, gid = (int(part) for part in config["user"])
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    if program is None:
        os.execvpe(argv[0], argv, env)
    os.environ.clear()
    os.environ.update(env)
    sys.argv = ["-c"]
    del config
    program.main()  # type: ignore[attr-defined]
    sys.exit(0)


if __name__ == "__main__":
    try:
        main()
    except Exception as exc:  # the console is where a guest's failure can be seen
        sys.stderr.write(f"treadle: cannot start the workload: {exc}\n")
    sys.exit(127)
