"""One workload's usage, read now and then from its cgroup's counters, as usage records: one
per interval, numbered from 1, each what the workload used since the last (the counters are
cumulative; the records are their differences, so they add up to the whole).

Counters only rise: one read lower than the last (a counter that restarted) starts again from
there, and one that cannot be read counts nothing until it can again.

Memory held over time is the trapezoid of what it held at each end of an interval (GiB
seconds); its peak is the most either end saw. Paused time is counted from the moments the
workload was paused and resumed (`pause`, `resume`): a paused interval is charged for memory
alone (`treadle.domain.pricing`).
"""

from __future__ import annotations

import time
from typing import Literal

from treadle.protocol import UsageRecord
from treadle.shuttle.gpus import GpuUse
from treadle.shuttle.sandbox.cgroups import GroupUsage

__all__ = ["ZERO", "Meter"]

_GIB = float(2**30)
_MIB = float(2**20)
# The cumulative counters of `GroupUsage` a record holds the rise of.
_RISING = ("cpu_ns", "disk_read_bytes", "disk_write_bytes", "net_in_bytes", "net_out_bytes")
# A workload's counters from its start: a new cgroup and a new network namespace count from 0.
ZERO = GroupUsage(cpu_ns=0, disk_read_bytes=0, disk_write_bytes=0, net_in_bytes=0, net_out_bytes=0)


class Meter:
    def __init__(
        self, kind: Literal["execution", "sandbox"], workload_id: str, generation: int
    ) -> None:
        self.kind = kind
        self.id = workload_id
        self.generation = generation
        self.seq = 0
        self._since = time.time()
        self._last: dict[str, int] = {}
        self._memory: int | None = None
        self._paused_s = 0.0  # in the interval so far
        self._paused_at: float | None = None

    def start(self, counters: GroupUsage | None) -> None:
        """The workload runs from now: what its counters say now is where its use starts."""
        self._since = time.time()
        if counters is not None:
            self._rises(counters)
            self._memory = counters.memory_bytes

    def pause(self) -> None:
        if self._paused_at is None:
            self._paused_at = time.time()

    def resume(self) -> None:
        if self._paused_at is not None:
            self._paused_s += max(0.0, time.time() - max(self._paused_at, self._since))
            self._paused_at = None

    def sample(
        self,
        counters: GroupUsage | None,
        *,
        final: bool = False,
        peak_bytes: int | None = None,
        gpus: GpuUse | None = None,
    ) -> UsageRecord:
        """The record of the interval since the last one (or the start), ending now;
        `peak_bytes`: the most memory it held in the interval, where known otherwise;
        `gpus`: how busy its devices are now, taken for the whole interval it ran."""
        now = max(time.time(), self._since)
        wall = now - self._since
        paused = self._paused_s
        if self._paused_at is not None:
            paused += max(0.0, now - max(self._paused_at, self._since))
        rises = self._rises(counters)
        memory = counters.memory_bytes if counters is not None else None
        ends = [m for m in (self._memory, memory) if m is not None]
        gib_s = (sum(ends) / len(ends)) / _GIB * wall if ends else 0.0
        peaks = [*ends, *([peak_bytes] if peak_bytes is not None else [])]
        self.seq += 1
        record = UsageRecord(
            kind=self.kind,
            id=self.id,
            generation=self.generation,
            seq=self.seq,
            start=self._since,
            end=now,
            final=final,
            wall_s=wall,
            paused_s=min(paused, wall),
            cpu_s=min(rises["cpu_ns"] / 1e9, 366 * 24 * 3600.0),
            memory_peak_mib=max(peaks) / _MIB if peaks else 0.0,
            memory_gib_s=gib_s,
            disk_read_bytes=rises["disk_read_bytes"],
            disk_write_bytes=rises["disk_write_bytes"],
            net_in_bytes=rises["net_in_bytes"],
            net_out_bytes=rises["net_out_bytes"],
            gpu_s=0.0 if gpus is None else gpus.busy * max(0.0, wall - min(paused, wall)),
            gpu_memory_peak_mib=0.0 if gpus is None else gpus.memory_mib,
        )
        self._since = now
        self._paused_s = 0.0
        if memory is not None:
            self._memory = memory
        return record

    def _rises(self, counters: GroupUsage | None) -> dict[str, int]:
        """How much each counter rose since its last read, and remember this one."""
        rises = dict.fromkeys(_RISING, 0)
        if counters is None:
            return rises
        for name in _RISING:
            value = getattr(counters, name)
            if value is None:
                continue
            last = self._last.get(name)
            if last is not None and value >= last:
                rises[name] = min(value - last, 2**53)
            self._last[name] = value
        return rises
