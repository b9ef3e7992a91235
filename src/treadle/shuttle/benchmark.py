"""The node's performance score: how fast one core hashes, next to a reference machine.

Measured once at start-up, in a worker thread, for `duration_s` (50 ms): long enough to be
steady within a few percent on an idle core, short enough not to delay joining. It scores a
single core because an execution's speed is mostly one core's. 1.0 means SHA-256 at
1,000 MB/s; only ratios between nodes matter to the scheduler.
"""

from __future__ import annotations

import hashlib
import time

__all__ = ["REFERENCE_MB_PER_S", "cpu_score"]

REFERENCE_MB_PER_S = 1000.0
_BLOCK = b"\x5a" * (64 * 1024)


def cpu_score(duration_s: float = 0.05) -> float:
    """Relative single-core speed (higher is faster), rounded to two decimals, ≥ 0.01."""
    digest = hashlib.sha256()
    done = 0
    start = time.perf_counter()
    deadline = start + duration_s
    while True:
        for _ in range(8):
            digest.update(_BLOCK)
        done += 8 * len(_BLOCK)
        now = time.perf_counter()
        if now >= deadline:
            break
    mb_per_s = done / (now - start) / 1e6
    return max(0.01, round(mb_per_s / REFERENCE_MB_PER_S, 2))
