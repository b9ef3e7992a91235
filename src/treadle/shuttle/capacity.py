"""What this host offers: CPU, memory, disk and GPUs, with operator overrides winning."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from pathlib import Path

from treadle.domain.resources import Resources
from treadle.shuttle.settings import ShuttleSettings

__all__ = ["detect_capacity"]

log = logging.getLogger(__name__)

_MIB = 1024 * 1024
_GPU_TYPE_MAX = 64


def detect_capacity(settings: ShuttleSettings) -> Resources:
    """Blocking (it may run `nvidia-smi`): call it once at start-up, off the event loop."""
    gpu_count, gpu_type = _gpus()
    return Resources(
        cpu_millicores=settings.cpu_millicores or (os.cpu_count() or 1) * 1000,
        memory_mib=settings.memory_mib or _memory_mib() or 1,
        disk_mib=_disk_mib(settings.home),
        gpu_count=gpu_count,
        gpu_type=gpu_type,
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


def _gpus() -> tuple[int, str | None]:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return 0, None
    try:
        out = subprocess.run(
            [smi, "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("nvidia-smi is installed but failed, advertising no GPUs: %s", exc)
        return 0, None
    names = [line.strip() for line in out.splitlines() if line.strip()]
    if not names:
        return 0, None
    return len(names), names[0][:_GPU_TYPE_MAX]
