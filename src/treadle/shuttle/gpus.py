"""GPUs on this host: detection, a short type name to match requests against, handing each
attempt its own devices, and reading how busy they are.

An attempt sees only the devices it was given, through CUDA_VISIBLE_DEVICES (an empty value
hides every GPU from one that asked for none). In the process tier that is advice to CUDA,
not enforcement: the device files stay reachable. Stronger tiers enforce it with device
cgroups and mounts.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from treadle.domain.resources import gpu_type

__all__ = ["Gpu", "GpuPool", "GpuUse", "GpuUseReader", "detect_gpus", "gpu_type", "parse_use"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Gpu:
    index: int
    uuid: str
    name: str
    memory_mib: int


SIMULATED_PREFIX = "GPU-simulated-"


def simulated_gpus(spec: str) -> list[Gpu]:
    """`COUNT:TYPE` devices that do not exist, named so that `gpu_type` gives TYPE back."""
    count, _, model = spec.partition(":")
    return [
        Gpu(index=i, uuid=f"{SIMULATED_PREFIX}{i}", name=model, memory_mib=0)
        for i in range(int(count))
    ]


def detect_gpus() -> list[Gpu]:
    """Blocking (runs nvidia-smi): call once at start-up, off the event loop."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    out = _query(smi, "index,uuid,name,memory.total", "advertising no GPUs")
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


@dataclass(frozen=True, slots=True)
class GpuUse:
    """How busy some devices are now: the sum of their utilizations (1.0 is one device
    fully busy) and the device memory they hold."""

    busy: float
    memory_mib: float


class GpuUseReader:
    """Reads devices' utilization and memory with nvidia-smi: one run serves every workload
    that asks within `max_age_s`. Simulated devices read as idle and empty: they do not
    exist. Blocking: call off the event loop."""

    def __init__(self, smi: str | None = None, max_age_s: float = 1.0) -> None:
        self._smi = smi if smi is not None else shutil.which("nvidia-smi")
        self._max_age_s = max_age_s
        self._lock = threading.Lock()
        self._read_at = -max_age_s
        self._by_uuid: dict[str, tuple[float, float]] = {}

    def read(self, uuids: Sequence[str]) -> GpuUse | None:
        """The use of these devices now; None for none that can be read."""
        real = [uuid for uuid in uuids if not uuid.startswith(SIMULATED_PREFIX)]
        if not real or self._smi is None:
            return None
        with self._lock:
            if time.monotonic() - self._read_at >= self._max_age_s:
                self._by_uuid = self._query()
                self._read_at = time.monotonic()
            found = [self._by_uuid[uuid] for uuid in real if uuid in self._by_uuid]
        if not found:
            return None
        return GpuUse(sum(f[0] for f in found), sum(f[1] for f in found))

    def _query(self) -> dict[str, tuple[float, float]]:
        assert self._smi is not None
        return parse_use(
            _query(self._smi, "uuid,utilization.gpu,memory.used", "GPU use is not read this time")
        )


def _query(smi: str, fields: str, otherwise: str) -> str:
    """nvidia-smi's CSV answer for `fields` of every device ("" when it fails)."""
    try:
        return subprocess.run(
            [smi, f"--query-gpu={fields}", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("nvidia-smi failed, %s: %s", otherwise, exc)
        return ""


def parse_use(out: str) -> dict[str, tuple[float, float]]:
    """{uuid: (utilization as a fraction, memory used in MiB)} from nvidia-smi's CSV; a
    field it cannot give ("[N/A]") reads as 0."""
    found: dict[str, tuple[float, float]] = {}
    for line in out.splitlines()[:64]:
        fields = [f.strip() for f in line.split(",")]
        if len(fields) != 3 or not fields[0]:
            continue
        values = []
        for field in fields[1:]:
            try:
                value = float(field)
            except ValueError:
                value = 0.0
            values.append(value if 0 <= value < 2**40 else 0.0)
        found[fields[0]] = (min(values[0], 100.0) / 100, values[1])
    return found


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

    def held(self, key: tuple[str, int]) -> list[Gpu]:
        return list(self._held.get(key, ()))

    def give_back(self, key: tuple[str, int]) -> None:
        self._free.extend(self._held.pop(key, []))
        self._free.sort(key=lambda gpu: gpu.index)

    @staticmethod
    def env(gpus: list[Gpu]) -> dict[str, str]:
        visible = ",".join(gpu.uuid for gpu in gpus)
        return {"CUDA_VISIBLE_DEVICES": visible, "NVIDIA_VISIBLE_DEVICES": visible or "void"}
