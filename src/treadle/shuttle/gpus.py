"""GPUs on this host: detection, a short type name to match requests against, and handing
each attempt its own devices.

An attempt sees only the devices it was given, through CUDA_VISIBLE_DEVICES (an empty value
hides every GPU from one that asked for none). In the process tier that is advice to CUDA,
not enforcement: the device files stay reachable. Stronger tiers enforce it with device
cgroups and mounts.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from dataclasses import dataclass

from treadle.domain.resources import gpu_type

__all__ = ["Gpu", "GpuPool", "detect_gpus", "gpu_type"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Gpu:
    index: int
    uuid: str
    name: str
    memory_mib: int


def simulated_gpus(spec: str) -> list[Gpu]:
    """`COUNT:TYPE` devices that do not exist, named so that `gpu_type` gives TYPE back."""
    count, _, model = spec.partition(":")
    return [
        Gpu(index=i, uuid=f"GPU-simulated-{i}", name=model, memory_mib=0) for i in range(int(count))
    ]


def detect_gpus() -> list[Gpu]:
    """Blocking (runs nvidia-smi): call once at start-up, off the event loop."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run(
            [smi, "--query-gpu=index,uuid,name,memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("nvidia-smi is installed but failed, advertising no GPUs: %s", exc)
        return []
    gpus = []
    for line in out.splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) != 4:
            continue
        try:
            gpus.append(Gpu(int(fields[0]), fields[1], fields[2], int(float(fields[3]))))
        except ValueError:
            log.warning("ignoring an nvidia-smi line it could not read: %r", line)
    return gpus


class GpuPool:
    """Which device each running attempt holds."""

    def __init__(self, gpus: list[Gpu]) -> None:
        self._free = list(gpus)
        self._held: dict[tuple[str, int], list[Gpu]] = {}

    def take(self, key: tuple[str, int], count: int) -> list[Gpu] | None:
        """`count` free devices for `key`, or None when fewer are free."""
        if count > len(self._free):
            return None
        taken, self._free = self._free[:count], self._free[count:]
        self._held[key] = taken
        return taken

    def give_back(self, key: tuple[str, int]) -> None:
        self._free.extend(self._held.pop(key, []))
        self._free.sort(key=lambda gpu: gpu.index)

    @staticmethod
    def env(gpus: list[Gpu]) -> dict[str, str]:
        visible = ",".join(gpu.uuid for gpu in gpus)
        return {"CUDA_VISIBLE_DEVICES": visible, "NVIDIA_VISIBLE_DEVICES": visible or "void"}
