"""The step between a microVM guest's init and its workload's first program.

The guest's init knows nothing of the workload; the node attached a config disk that says
it (JSON padded with NULs, at the path in `TREADLE_AGENT_CONFIG`): the program to run (the
guest agent, as in every tier), its environment, the wall-clock time to take, and the
confinement every tier gives sandboxed code. Here, as the guest's root, it:

- sets the guest's clock to the node's (the guest's own clock starts from a one-second RTC),
  less nothing: the node writes the time when QEMU starts, and adds the seconds the guest
  took to get here;
- drops from the bounding set every capability but those the node lists, so a process that
  runs as the sandbox's root holds those and nothing more, as in the other tiers;
- sets no_new_privs and installs the node's seccomp filter (the sandbox layer's, the same
  program bubblewrap installs), so the agent and all it starts meet the same system-call
  policy as everywhere else, even though the guest's kernel is the boundary here;
- then executes the program, with exactly the given environment, as the sandbox's user where
  the sandbox has no users of its own (its agent settles as that user itself otherwise).

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


class _Filter(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


class _Timespec(ctypes.Structure):
    _fields_ = [("sec", ctypes.c_long), ("nsec", ctypes.c_long)]


def read_config(path: str) -> dict:
    with open(path, "rb") as f:
        data = f.read(1 << 22)
    config: dict = json.JSONDecoder().raw_decode(data.split(b"\0", 1)[0].decode())[0]
    return config


def main() -> None:
    config = read_config(os.environ["TREADLE_AGENT_CONFIG"])
    libc = ctypes.CDLL(None, use_errno=True)
    if config.get("time") is not None:
        # The node's clock when QEMU started, plus the guest's time since its kernel did.
        now = float(config["time"]) + time.clock_gettime(time.CLOCK_BOOTTIME)
        spec = _Timespec(int(now), int((now % 1) * 1e9))
        libc.clock_settime(_CLOCK_REALTIME, ctypes.byref(spec))
    keep = config.get("capabilities")
    if keep is not None:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            last = int(f.read())
        for cap in range(last + 1):
            if cap not in keep and libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
                raise OSError(ctypes.get_errno(), f"cannot drop capability {cap}")
    env = {str(k): str(v) for k, v in config["env"].items()}
    home = env.get("HOME")
    if home:
        os.makedirs(home, exist_ok=True)
        owner = config.get("user") or env.get("TREADLE_AGENT_USER", "").split(":")
        if owner and owner[0] != "":
            os.chown(home, int(owner[0]), int(owner[1]))
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "cannot set no_new_privs")
    program = config.get("seccomp")
    if program:
        code = bytes.fromhex(program)
        buffer = ctypes.create_string_buffer(code, len(code))
        prog = _Filter(len(code) // 8, ctypes.cast(buffer, ctypes.c_void_p))
        if libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "cannot install the seccomp filter")
    argv = [str(arg) for arg in config["argv"]]
    os.chdir(home or "/")
    if config.get("user"):
        uid, gid = (int(part) for part in config["user"])
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    os.execvpe(argv[0], argv, env)


if __name__ == "__main__":
    try:
        main()
    except Exception as exc:  # the console is where a guest's failure can be seen
        sys.stderr.write(f"treadle: cannot start the workload: {exc}\n")
    sys.exit(127)
