"""What a bundle needs to know about a root filesystem, shared by `images` and `bundle`."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from treadle.shuttle.sandbox.policy import WORK_DIR

__all__ = [
    "MOUNT_POINTS",
    "RESULT_DIR",
    "WORK_DIR",
    "Rootfs",
    "add_mount_points",
    "mount_point",
]

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


def mount_point(rootfs: Rootfs, target: str) -> None:
    """Make the directory `target` in the rootfs where missing, as `add_mount_points` does
    for the rootfs's own: a runtime that finds a mount point missing creates it itself, in
    the shared cache or failing on a read-only one. Every step is taken without following
    links: an image's `/.x -> /etc` must not have Shuttle make directories on the host. An
    image with anything but directories on the way cannot have the mount."""
    parts = [part for part in target.split("/") if part]
    if not parts or any(part in (".", "..") for part in parts):
        raise ValueError(f"invalid mount point {target!r}")
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(rootfs.path, flags)
    try:
        for part in parts:
            made = True
            try:
                os.mkdir(part, 0o755, dir_fd=fd)
            except FileExistsError:
                made = False
            try:
                step = os.open(part, flags, dir_fd=fd)
            except OSError as exc:  # a link (ELOOP) or a file (ENOTDIR)
                raise ValueError(
                    f"image {rootfs.reference!r} has {target} other than as directories, "
                    "where treadle mounts its own"
                ) from exc
            os.close(fd)
            fd = step
            if made:
                os.fchmod(fd, 0o755)  # whatever the umask: the sandbox's user passes through
    finally:
        os.close(fd)
