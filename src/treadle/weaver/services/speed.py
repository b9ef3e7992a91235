"""Node speed refreshed from observed run times.

Shuttle measures its speed once at start (`shuttle.benchmark`); what programs take tells
more. For each function version, the CPU time its runs took, scaled by the speed of the
node each ran on, estimates the work it is (in "seconds at speed 1"); a run's speed sample
is that work over the CPU time it took. A node's speed moves towards its samples (EWMA), so
a node that is slower than it claimed (noisy neighbours, throttling) loses placements it
would have won under `best_performance`. CPU time, not wall time: waiting on I/O or sleep
says nothing about the core. Runs shorter than `MIN_CPU_MS` are overhead, not work.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable

__all__ = ["MIN_CPU_MS", "SpeedObserver"]

MIN_CPU_MS = 50.0
_ALPHA_WORK = 0.2  # the work estimate of a function version
_ALPHA_SPEED = 0.1  # a node's speed
_MAX_KINDS = 10_000


class SpeedObserver:
    def __init__(self) -> None:
        self._work: OrderedDict[Hashable, float] = OrderedDict()

    def sample(self, kind: Hashable, cpu_ms: float | None, speed: float) -> float:
        """The node's next speed after a run of `kind` that took `cpu_ms` on it."""
        if cpu_ms is None or cpu_ms < MIN_CPU_MS or speed <= 0:
            return speed
        work = cpu_ms * speed
        known = self._work.get(kind)
        if known is None:
            # The first run of a kind only tells what the kind costs.
            self._remember(kind, work)
            return speed
        self._remember(kind, known + _ALPHA_WORK * (work - known))
        observed = known / cpu_ms
        return speed + _ALPHA_SPEED * (observed - speed)

    def _remember(self, kind: Hashable, work: float) -> None:
        self._work[kind] = work
        self._work.move_to_end(kind)
        while len(self._work) > _MAX_KINDS:
            self._work.popitem(last=False)
