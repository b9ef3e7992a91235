"""What this host offers: CPU, memory, disk and GPUs, with operator overrides winning."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from treadle.domain.resources import Resources
from treadle.shuttle.gpus import Gpu, gpu_type
from treadle.shuttle.settings import ShuttleSettings

__all__ = ["detect_capacity"]

log = logging.getLogger(__name__)

_MIB = 1024 * 1024


def detect_capacity(settings: ShuttleSettings, gpus: list[Gpu]) -> Resources:
    """What to advertise, given the GPUs `detect_gpus` found."""
    return Resources(
        cpu_millicores=settings.cpu_millicores or (os.cpu_count() or 1) * 1000,
        memory_mib=settings.memory_mib or _memory_mib() or 1,
        disk_mib=_disk_mib(settings.home),
        gpu_count=len(gpus),
        gpu_type=gpu_type(gpus[0].name) if gpus else None,
    )


def _memory_mib() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) // 1024  # the file counts kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def _disk_mib(home: Path) -> int:
    # home may not exist yet on a first start: measure the filesystem it will live on.
    for path in (home, *home.parents):
        try:
            st = os.statvfs(path)
        except OSError:
            continue
        return st.f_bavail * st.f_frsize // _MIB
    return 0
