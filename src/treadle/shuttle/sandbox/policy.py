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
    "ARGS_FILE",
    "MASKED_PATHS",
    "PATH",
    "READONLY_PATHS",
    "RESULT_FD",
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


def masked_in_proc() -> list[str]:
    """The masked paths under /proc (a sandbox without /sys needs no others)."""
    return [path for path in MASKED_PATHS if path.startswith("/proc/")]
