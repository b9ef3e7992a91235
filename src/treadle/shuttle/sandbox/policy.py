"""What every sandbox hides of the host's kernel state, whatever its tier (the calls it may
not make are in `seccomp`).

The masked paths are Docker's defaults: /proc and /sys entries that describe the whole host
(its interrupts, timers, scheduler, keys, memory image, firmware) rather than the sandbox,
or offer an attack surface. A sandbox sees them empty. The read-only ones stay readable but
cannot be written, capabilities or not.
"""

from __future__ import annotations

__all__ = ["MASKED_PATHS", "READONLY_PATHS", "masked_in_proc"]

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
