"""What a bundle needs to know about a root filesystem, shared by `images` and `bundle`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from treadle.shuttle.sandbox.policy import WORK_DIR

__all__ = ["MOUNT_POINTS", "RESULT_DIR", "WORK_DIR", "Rootfs", "add_mount_points"]

# Where the result FIFO is mounted when the runtime cannot pass fd 3 itself.
RESULT_DIR = "/dev/treadle"
# Directories the bundle mounts over. Every rootfs gets them up front: a runtime that finds
# one missing creates it in the rootfs itself (runsc does so even under /dev), which would
# write to the shared cache, and fails where the rootfs is not writable by it.
MOUNT_POINTS = ("/proc", "/dev", "/sys", "/tmp", WORK_DIR, RESULT_DIR)


@dataclass(frozen=True, slots=True)
class Rootfs:
    """A root filesystem ready to be mounted read-only as `/` of a bundle.

    `path` is a real directory (no symlink on the way: runc refuses one as `root.path`).
    `binds` are host paths mounted read-only at the same place inside (the host rootfs).
    `env` is the image's configured environment (`KEY=VALUE`), the base of the program's.
    `cached` tells whether this resolution found everything already on disk (no copy from a
    registry, no unpack).
    """

    path: Path
    reference: str
    digest: str | None = None
    env: tuple[str, ...] = ()
    binds: tuple[str, ...] = ()
    cached: bool = False


def add_mount_points(rootfs: Path) -> None:
    for name in MOUNT_POINTS:
        path = rootfs / name.lstrip("/")
        if path.is_symlink() or path.exists():
            continue
        path.mkdir(parents=True)
        # runc gives a tmpfs the mode of the directory it covers.
        path.chmod(0o1777 if name == "/tmp" else 0o755)
