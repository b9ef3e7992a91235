"""What a program finds in every sandbox, whatever its tier, and what every sandbox hides of
the host's kernel state (the calls it may not make are in `seccomp`).

The program's side of the contract: its work dir `WORK_DIR` (cwd, HOME, TMPDIR), the args
file `ARGS_FILE` in it, its result written to fd `RESULT_FD`, and `PATH` unless its function
or image says otherwise.

The masked paths are Docker's defaults: /proc and /sys entries that describe the whole host
(its interrupts, timers, scheduler, keys, memory image, firmware) rather than the sandbox,
or offer an attack surface. A sandbox sees them empty. The read-only ones stay readable but
cannot be written, capabilities or not.
"""

from __future__ import annotations

__all__ = [
    "AGENT_SUDO_ENV",
    "AGENT_USER_ENV",
    "ARGS_FILE",
    "CAPABILITY_NUMBERS",
    "MASKED_PATHS",
    "PATH",
    "READONLY_PATHS",
    "RESULT_FD",
    "ROOT_CAPABILITIES",
    "WORK_DIR",
    "masked_in_proc",
]

WORK_DIR = "/work"
ARGS_FILE = "args.json"
RESULT_FD = 3
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

MASKED_PATHS = (
    "/proc/acpi",
    "/proc/asound",
    "/proc/interrupts",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/sys/devices/virtual/powercap",
    "/sys/firmware",
)
READONLY_PATHS = (
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
)


# What root inside a sandbox holds, in tiers whose sandboxes have users of their own (a
# sandbox's guest agent starts as that root, and so does a process exec'd as root): enough to
# become any of the sandbox's users and to own and reach their files, as root on a machine
# does, and nothing more (no CAP_SYS_ADMIN, CAP_NET_ADMIN, CAP_NET_RAW, CAP_MKNOD, ...). They
# count inside the sandbox's user namespace only, where no host id is mapped: a host file is
# nobody's there, and capabilities do not apply to it.
ROOT_CAPABILITIES = (
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_NET_BIND_SERVICE",
    "CAP_SETGID",
    "CAP_SETUID",
)
# Linux's capability numbers (linux/capability.h), for what sets capabilities by number (a
# microVM guest's bounding set).
CAPABILITY_NUMBERS = {
    name: number
    for number, name in enumerate(
        [
            "CAP_CHOWN",
            "CAP_DAC_OVERRIDE",
            "CAP_DAC_READ_SEARCH",
            "CAP_FOWNER",
            "CAP_FSETID",
            "CAP_KILL",
            "CAP_SETGID",
            "CAP_SETUID",
            "CAP_SETPCAP",
            "CAP_LINUX_IMMUTABLE",
            "CAP_NET_BIND_SERVICE",
            "CAP_NET_BROADCAST",
            "CAP_NET_ADMIN",
            "CAP_NET_RAW",
            "CAP_IPC_LOCK",
            "CAP_IPC_OWNER",
            "CAP_SYS_MODULE",
            "CAP_SYS_RAWIO",
            "CAP_SYS_CHROOT",
            "CAP_SYS_PTRACE",
            "CAP_SYS_PACCT",
            "CAP_SYS_ADMIN",
            "CAP_SYS_BOOT",
            "CAP_SYS_NICE",
            "CAP_SYS_RESOURCE",
            "CAP_SYS_TIME",
            "CAP_SYS_TTY_CONFIG",
            "CAP_MKNOD",
            "CAP_LEASE",
            "CAP_AUDIT_WRITE",
            "CAP_AUDIT_CONTROL",
            "CAP_SETFCAP",
            "CAP_MAC_OVERRIDE",
            "CAP_MAC_ADMIN",
            "CAP_SYSLOG",
            "CAP_WAKE_ALARM",
            "CAP_BLOCK_SUSPEND",
            "CAP_AUDIT_READ",
            "CAP_PERFMON",
            "CAP_BPF",
            "CAP_CHECKPOINT_RESTORE",
        ]
    )
}
# Given to a guest agent started with ROOT_CAPABILITIES: "uid:gid" of the sandbox's user, the
# one it acts as unless a request names another (`treadle.guest.agent`).
AGENT_USER_ENV = "TREADLE_AGENT_USER"
# Given to a guest agent that is to take `sudo` requests: the abstract socket to listen on.
AGENT_SUDO_ENV = "TREADLE_AGENT_SUDO"


def masked_in_proc() -> list[str]:
    """The masked paths under /proc (a sandbox without /sys needs no others)."""
    return [path for path in MASKED_PATHS if path.startswith("/proc/")]
